"""DiskTier: one frame per file under a directory, written atomically, verified on read.

Layout: ``<root>/<spec short_fp>/<first 2 hex of key>/<key hex>.kvf``. A write goes to a temporary
file in the same directory and is renamed over the final name (``os.replace`` is atomic on
POSIX), so a reader sees a whole frame or none. Reopening the directory finds the blocks again
(file names are keys; sizes come from the directory listing; contents are verified on read).
Leftover temporary files from a crash are deleted on open.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..codecs import Codec, codec_for_block, get_codec
from ..frames import FrameError, FrameIncomplete, decode_frame, decode_frame_header, encode_frame_parts, header_read_size
from ..spec import KVSpec
from .base import TierBase, TierCapabilities

log = logging.getLogger(__name__)
_SUFFIX = ".kvf"
_TMP_PREFIX = ".tmp-"
_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)  # not on every platform


class _OpenFiles:
    """Frame files kept open for range reads, at most ``max_open`` (LRU), so that a decode step's
    reads are ``pread`` calls, not ``open`` + ``pread`` + ``close`` per block. An entry in use by a
    reader is closed only once that reader releases it (an evicted or dropped file descriptor is
    never closed under a reader, whose number could then name another file)."""

    def __init__(self, max_open: int) -> None:
        self.max_open = max_open
        self._fds: OrderedDict[bytes, list] = OrderedDict()  # key -> [fd, readers, dropped]
        self._lock = threading.Lock()

    def acquire(self, key: bytes, path: str) -> list:
        with self._lock:
            e = self._fds.get(key)
            if e is not None:
                e[1] += 1
                self._fds.move_to_end(key)
                return e
        fd = os.open(path, os.O_RDONLY)  # OSError to the caller
        with self._lock:
            e = self._fds.get(key)
            if e is not None:  # another reader opened it meanwhile
                e[1] += 1
                os.close(fd)
                return e
            e = [fd, 1, False]
            if self.max_open:
                self._fds[key] = e
                while len(self._fds) > self.max_open:
                    self._drop(self._fds.popitem(last=False)[1])
            else:
                e[2] = True  # not kept: closed at release
            return e

    def release(self, e: list) -> None:
        with self._lock:
            e[1] -= 1
            if e[2] and not e[1]:
                os.close(e[0])

    def _drop(self, e: list) -> None:  # under the lock
        e[2] = True
        if not e[1]:
            os.close(e[0])

    def drop(self, key: bytes) -> None:
        """Close ``key``'s file (once its readers are done): it was removed or may have changed."""
        with self._lock:
            e = self._fds.pop(key, None)
            if e is not None:
                self._drop(e)

    def close(self) -> None:
        with self._lock:
            while self._fds:
                self._drop(self._fds.popitem()[1])

    def __len__(self) -> int:
        return len(self._fds)


def _write_all(fd: int, parts: Sequence) -> None:
    """Every byte of ``parts`` to ``fd`` in order (``writev``, again from where a short write stopped)."""
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    while views:
        n = os.writev(fd, views)
        if n <= 0:
            raise OSError("disk tier: the file took no bytes")
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class DiskTier(TierBase):
    capabilities = TierCapabilities(device="disk", persistent=True, shared=False, framed=True, iterable=True, range_reads=True)

    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int,
        *,
        codec: str | Codec = "identity",
        name: str = "disk",
        fsync: bool = False,
        min_free_bytes: int = 0,
        cipher=None,
        open_files: int = 256,
        drop_written_pages: bool = True,
    ) -> None:
        """``min_free_bytes``: while the filesystem has less free space, ``put`` stores nothing
        (every block refused, ``low_space`` set): a full disk refuses cleanly instead of failing
        writes half-way. ``cipher``: a ``kvstore.crypto.FrameCipher`` that encrypts every file
        (files it cannot open are misses, deleted and counted as corrupt). ``open_files``: frame
        files kept open for range reads (page reads of ``TierAttention``), least recently used
        closed first; 0 opens and closes a file per read. ``drop_written_pages`` (with ``fsync``): once a
        file is fsync'ed, its pages are dropped from the kernel's page cache
        (``posix_fadvise(POSIX_FADV_DONTNEED)``; they are clean then, so nothing is lost and nothing
        waits). A block demoted here is the coldest of the tier above, and keeping its copy in the page
        cache grew the cache by every byte written: each new file then took fresh pages, and writing
        6 MiB cost 11 ms of CPU instead of 2.7 ms on the 2-core VM of docs/data-path.md (the pages
        dropped are reused). A later read of the block comes from the device. Without ``fsync`` the
        written pages are dirty and the kernel writes them back on its own schedule: nothing is dropped."""
        if capacity_bytes is None:
            raise ValueError("DiskTier needs a capacity_bytes")
        if isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int) or min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be a non-negative int, got {min_free_bytes!r}")
        if isinstance(open_files, bool) or not isinstance(open_files, int) or open_files < 0:
            raise ValueError(f"open_files must be a non-negative int, got {open_files!r}")
        super().__init__(name, get_codec(codec) if isinstance(codec, str) else codec, capacity_bytes)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_str = str(self.root)
        self.fsync = bool(fsync)
        self.drop_written_pages = bool(drop_written_pages)
        self.min_free_bytes = min_free_bytes
        self.cipher = cipher
        self.low_space = False  # the last put found less than min_free_bytes free
        # key -> (spec short_fp, file size). Rebuilt from the directory listing on open.
        self._files: dict[bytes, tuple[str, int]] = {}
        self._data_offset: dict[bytes, int] = {}  # key -> where the payload starts in its file (range reads)
        self._open = _OpenFiles(open_files)
        self._scan()

    # -- layout ----------------------------------------------------------------------------
    def _path(self, key: bytes, short_fp: str) -> Path:
        return Path(self._path_str(key, short_fp))

    def _path_str(self, key: bytes, short_fp: str) -> str:
        """The frame file's path as a string (range reads open a file per block: no Path objects there)."""
        h = key.hex()
        return f"{self._root_str}/{short_fp}/{h[:2]}/{h}{_SUFFIX}"

    def _scan(self) -> None:
        for fp_dir in self.root.iterdir() if self.root.exists() else ():
            if not fp_dir.is_dir():
                continue
            for shard in fp_dir.iterdir():
                if not shard.is_dir():
                    continue
                for f in shard.iterdir():
                    name = f.name
                    if name.startswith(_TMP_PREFIX):
                        f.unlink(missing_ok=True)  # a write that never finished
                        continue
                    if not name.endswith(_SUFFIX) or len(name) != 64 + len(_SUFFIX):
                        continue
                    try:
                        key = bytes.fromhex(name[:64])
                        size = f.stat().st_size
                    except (ValueError, OSError):
                        continue
                    self._files[key] = (fp_dir.name, size)
                    self._stats.bytes += size
                    self._stats.blocks += 1

    def iter_keys(self, spec: KVSpec | None = None) -> Iterator[bytes]:
        """Keys held (of one spec when given), e.g. to rebuild an index after a restart."""
        short_fp = spec.short_fingerprint if spec is not None else None
        for key, (kfp, _) in list(self._files.items()):
            if short_fp is None or kfp == short_fp:
                yield key

    # -- protocol --------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes], *, spec: KVSpec) -> list[bool]:
        files, short_fp = self._files, spec.short_fingerprint
        out = []
        for k in keys:
            entry = files.get(bytes(k))
            out.append(entry is not None and entry[0] == short_fp)
        return out

    def put(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor], *, spec: KVSpec, first: Sequence[bool] | None = None) -> list[int]:
        self._check_put(keys, blocks, spec, first)
        if self.min_free_bytes:
            self.low_space = self.free_bytes() < self.min_free_bytes
            if self.low_space:
                with self._lock:
                    self._stats.refused += len(keys)
                return [self._files[bytes(k)][1] if bytes(k) in self._files else 0 for k in keys]
        sizes = []
        for i, (key, block) in enumerate(zip(keys, blocks)):
            key = bytes(key)
            with self._lock:
                entry = self._files.get(key)
            if entry is not None:
                sizes.append(entry[1])
                continue
            codec = codec_for_block(self.codec, bool(first[i])) if first is not None else self.codec
            payload, meta = codec.encode(block, spec)
            # header and payload are written one after the other, never joined: joining copies the whole
            # block into a new bytes object while holding the GIL (and faults its pages in), which stalled
            # every other request thread of the server for milliseconds per demoted block
            head, view = encode_frame_parts(key, spec, codec.name, meta, spec.block_shape, spec.dtype, payload)
            parts: tuple = (head, view)
            if self.cipher is not None:
                parts = (self.cipher.seal(key, b"".join(parts)),)
            nbytes = sum(memoryview(p).nbytes for p in parts)
            with self._lock:
                if not self._fits(nbytes):
                    self._stats.refused += 1
                    sizes.append(0)
                    continue
                # reserve the bytes before the write so concurrent puts cannot overshoot capacity
                self._stats.bytes += nbytes
            try:
                self._write_atomic(self._path(key, spec.short_fingerprint), parts)
            except OSError as e:
                with self._lock:
                    self._stats.bytes -= nbytes
                    self._stats.errors += 1
                log.warning("disk tier %s: write failed: %s", self.name, e)
                sizes.append(0)
                continue
            with self._lock:
                if key in self._files:  # a concurrent put of the same block (same bytes) renamed first
                    self._stats.bytes -= nbytes
                    sizes.append(self._files[key][1])
                    continue
                self._files[key] = (spec.short_fingerprint, nbytes)
                self._stats.blocks += 1
                self._stats.puts += 1
            sizes.append(nbytes)
        return sizes

    def free_bytes(self) -> int:
        """Bytes free for this process on the tier's filesystem (0 if it cannot be asked)."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _write_atomic(self, path: Path, parts: Sequence) -> None:
        """Write ``parts`` (buffers, one after the other) to a temporary file, fsync it when ``fsync``
        is set, and rename it to ``path``. The bytes go to the kernel straight from the buffers given
        (``os.writev``, the GIL released for the whole system call), never through a joined copy."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            try:
                _write_all(fd, parts)
                if self.fsync:
                    os.fsync(fd)
                    if self.drop_written_pages and _FADV_DONTNEED is not None:
                        os.posix_fadvise(fd, 0, 0, _FADV_DONTNEED)  # clean after the fsync: only frees the cache
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def get(self, keys: Sequence[bytes], *, spec: KVSpec, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        self._check_out(keys, out, spec)
        result: list[torch.Tensor | None] = []
        for i, key in enumerate(keys):
            key = bytes(key)
            entry = self._files.get(key)
            if entry is None or entry[0] != spec.short_fingerprint:
                with self._lock:
                    self._stats.misses += 1
                result.append(None)
                continue
            path = self._path(key, spec.short_fingerprint)
            try:
                with open(path, "rb") as f:
                    buf = f.read()
            except FileNotFoundError:
                self._forget(key)
                with self._lock:
                    self._stats.misses += 1
                result.append(None)
                continue
            except OSError as e:
                log.warning("disk tier %s: read failed: %s", self.name, e)
                with self._lock:
                    self._stats.errors += 1
                    self._stats.misses += 1
                result.append(None)
                continue
            try:
                if self.cipher is not None:
                    buf = self.cipher.open(key, buf)
                frame = decode_frame(buf, expect_key=key, expect_spec=spec)
                codec = self.codec if frame.codec == self.codec.name else get_codec(frame.codec)
                block = codec.decode(frame.data, frame.codec_meta, spec, out=out[i] if out is not None else None)
            except (FrameError, ValueError) as e:
                log.warning("disk tier %s: corrupt frame %s removed: %s", self.name, key.hex()[:16], e)
                self.remove([key], spec=spec)
                with self._lock:
                    self._stats.corrupt += 1
                    self._stats.misses += 1
                result.append(None)
                continue
            with self._lock:
                self._stats.hits += 1
            result.append(block)
        return result

    # -- range reads (paged codecs): pread of the spans asked -----------------------------------
    def _read_header(self, fd: int, key: bytes, spec: KVSpec):
        need = header_read_size(spec)
        while True:
            prefix = os.pread(fd, need, 0)
            try:
                header = decode_frame_header(prefix, expect_key=key, expect_spec=spec)
            except FrameIncomplete as e:
                if len(prefix) < need or e.need <= need:
                    raise FrameError("frame file is truncated") from None
                need = e.need
                continue
            with self._lock:
                self._data_offset[key] = header.data_offset
            return header

    def page_layouts(self, keys: Sequence[bytes], *, spec: KVSpec) -> list:
        from ..pages import PageLayout

        out: list = []
        sfp = spec.short_fingerprint
        for key in keys:
            key = bytes(key)
            entry = self._files.get(key)
            layout = None
            if entry is not None and entry[0] == sfp:
                try:
                    f = self._open.acquire(key, self._path_str(key, sfp))
                except OSError:
                    out.append(None)
                    continue
                try:
                    header = self._read_header(f[0], key, spec)
                    layout = PageLayout.from_meta(key, spec, header.codec, header.codec_meta)
                except (FrameError, ValueError, OSError) as e:
                    log.warning("disk tier %s: unreadable frame header %s: %s", self.name, key.hex()[:16], e)
                    layout = None
                finally:
                    self._open.release(f)
            out.append(layout)
        return out

    def read_spans(self, requests, *, spec: KVSpec) -> list[list[memoryview] | None]:
        """The spans ``(offset, nbytes)`` of each ``(key, spans)`` request (payload offsets), by
        ``pread`` on a kept-open file; spans that touch are read as one ``pread`` and split."""
        out: list[list[memoryview] | None] = []
        sfp = spec.short_fingerprint
        for key, spans in requests:
            key = bytes(key)
            entry = self._files.get(key)
            if entry is None or entry[0] != sfp:
                out.append(None)
                continue
            try:
                f = self._open.acquire(key, self._path_str(key, sfp))
            except OSError:
                out.append(None)
                continue
            try:
                fd = f[0]
                base = self._data_offset.get(key)
                if base is None:
                    base = self._read_header(fd, key, spec).data_offset
                got: list[memoryview] = []
                i = 0
                while i < len(spans):
                    off, n = spans[i]
                    j, end = i + 1, off + n
                    while j < len(spans) and spans[j][0] == end:  # adjacent: one pread
                        end += spans[j][1]
                        j += 1
                    buf = os.pread(fd, end - off, base + off)
                    if len(buf) != end - off:
                        raise FrameError("frame file is shorter than the span asked")
                    view = memoryview(buf)
                    for o, m in spans[i:j]:
                        got.append(view[o - off : o - off + m])
                    i = j
                out.append(got)
                with self._lock:
                    self._stats.hits += 1
            except (FrameError, OSError) as e:
                log.warning("disk tier %s: range read failed %s: %s", self.name, key.hex()[:16], e)
                with self._lock:
                    self._stats.errors += 1
                self.forget_layouts([key], spec=spec)
                out.append(None)
            finally:
                self._open.release(f)
        return out

    def forget_layouts(self, keys: Sequence[bytes], *, spec: KVSpec) -> None:
        """Forget what range reads remembered of these blocks (where the payload starts, the open
        file): called when a piece read from them did not verify."""
        for key in keys:
            key = bytes(key)
            with self._lock:
                self._data_offset.pop(key, None)
            self._open.drop(key)

    def close(self) -> None:
        self._open.close()

    def _forget(self, key: bytes) -> int:
        self._open.drop(key)
        with self._lock:
            self._data_offset.pop(key, None)
            entry = self._files.pop(key, None)
            if entry is None:
                return 0
            self._stats.bytes -= entry[1]
            self._stats.blocks -= 1
            self._stats.removed += 1
            return 1

    def remove(self, keys: Sequence[bytes], *, spec: KVSpec) -> int:
        n = 0
        for key in keys:
            key = bytes(key)
            entry = self._files.get(key)
            if entry is None:
                continue
            try:
                self._path(key, entry[0]).unlink(missing_ok=True)
            except OSError as e:
                log.warning("disk tier %s: delete failed: %s", self.name, e)
                with self._lock:
                    self._stats.errors += 1
                continue
            n += self._forget(key)
        return n
