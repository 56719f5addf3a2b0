"""S3-FIFO (Yang et al., SOSP'23): a small FIFO that filters one-hit wonders, a main FIFO with
lazy reinsertion, and a ghost FIFO of keys recently evicted from the small queue.

The algorithm, for one eviction (sizes in bytes; ``total`` = bytes tracked)::

    loop:
        if small is non-empty and (small_bytes >= small_ratio * total or main is empty):
            k = oldest of small
            freq(k) >= promote_threshold -> move k to main with freq 0          (PROMOTE)
            else                         -> evict k, remember it in ghost       (victim)
        else:
            k = oldest of main
            freq(k) > 0 -> move k to the newest end of main, freq(k) -= 1       (REINSERT)
            else        -> evict k                                              (victim)

    insert(k): k in ghost -> main (freq 0), else small (freq 0)
    hit(k):    freq(k) = min(freq(k) + 1, max_freq)

The size test is made before every step (the paper keeps scanning small once it started;
deciding per step makes the next step a function of the state alone, which the invariant
below needs).

The store asks for candidates first and evicts later, so the loop runs in two modes:

- ``candidates(n)`` runs it *virtually* (``_Simulation``): read-only iterators over the real
  queues plus a private deque for the keys the loop moves to the end of main. The simulation
  is memoised until the next mutation, so the store's ``candidates(16)``, ``candidates(32)``...
  resume it instead of starting over.
- ``on_remove(key)`` first *commits* the moves the loop makes before its first victim, then
  removes ``key`` from whichever queue holds it (from small: remembered in ghost).

Invariant: committing the moves before the first victim never changes the order, since the
loop run from the committed state is the rest of the loop run from the uncommitted one. So
after ``on_remove(candidates()[0])`` the policy is exactly the simulation after its first
victim, and ``candidates()`` returns the old list without its head. When the store skips
pinned or inner blocks and evicts a later candidate, only the moves before the *first* victim
are committed (those after it assumed the skipped block was gone) and the skipped block stays
at the head of its queue.

Memory: small + main hold the tracked keys; ghost holds at most ``ghost_ratio * len(self)``
keys (oldest forgotten first); a memoised simulation holds O(len(self)) moves.

``candidates(n)``: O(n + r), r = promotions and reinsertions the loop performs before its n-th
victim. r is amortised O(1) per hit or insert (each move consumes a unit of frequency earned
by a hit, or a key's single promotion), but one call may pay r <= |small| + max_freq * |main|
when every tracked block is hot.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .base import PolicyBase, check_insert, check_int, check_real, register_policy

PROMOTE, REINSERT = 0, 1


class _Entry:
    __slots__ = ("nbytes", "freq")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.freq = 0


class _Simulation:
    """The eviction loop run over a read-only view of the policy. Invalid after any mutation."""

    __slots__ = (
        "_policy",
        "_small_it",
        "_small_left",
        "_small_bytes",
        "_total_bytes",
        "_main_it",
        "_main_left",
        "_main_tail",
        "victims",
        "moves",
        "moves_before",
        "done",
    )

    def __init__(self, policy: "S3FIFOPolicy") -> None:
        self._policy = policy
        self._small_it = iter(policy._small.items())
        self._small_left = len(policy._small)
        self._small_bytes = policy._small_bytes
        self._total_bytes = policy._total_bytes
        self._main_it = iter(policy._main.items())
        self._main_left = len(policy._main)  # real main entries not yet examined
        self._main_tail: deque[tuple[bytes, int, int]] = deque()  # (key, nbytes, freq) moved to main's end
        self.victims: list[bytes] = []
        self.moves: list[tuple[int, bytes]] = []  # (PROMOTE | REINSERT, key), in loop order
        self.moves_before: list[int] = []  # moves_before[i] = len(moves) when victims[i] was chosen
        self.done = False

    def advance(self, n: int) -> None:
        """Run the loop until it has chosen ``n`` victims or nothing is left."""
        p = self._policy
        small_ratio, threshold = p.small_ratio, p.promote_threshold
        while len(self.victims) < n and not self.done:
            main_len = self._main_left + len(self._main_tail)
            if self._small_left and (not main_len or self._small_bytes >= small_ratio * self._total_bytes):
                key, e = next(self._small_it)
                self._small_left -= 1
                self._small_bytes -= e.nbytes
                if e.freq >= threshold:
                    self._main_tail.append((key, e.nbytes, 0))
                    self.moves.append((PROMOTE, key))
                else:
                    self._choose(key, e.nbytes)
            elif main_len:
                if self._main_left:
                    key, e = next(self._main_it)
                    self._main_left -= 1
                    nbytes, freq = e.nbytes, e.freq
                else:
                    key, nbytes, freq = self._main_tail.popleft()
                if freq > 0:
                    self._main_tail.append((key, nbytes, freq - 1))
                    self.moves.append((REINSERT, key))
                else:
                    self._choose(key, nbytes)
            else:
                self.done = True

    def _choose(self, key: bytes, nbytes: int) -> None:
        self._total_bytes -= nbytes
        self.moves_before.append(len(self.moves))
        self.victims.append(key)


@register_policy
class S3FIFOPolicy(PolicyBase):
    """S3-FIFO over bytes: one-hit wonders leave from the small queue, reused blocks live in main.

    Options:
      ``small_ratio`` (0 < r < 1, default 0.1): the small queue is drained first while it holds
          at least this share of the tracked *bytes* (bytes, not blocks: tiers are sized in bytes
          and blocks of different codecs or models differ in size);
      ``ghost_ratio`` (>= 0, default 0.9): the ghost queue remembers at most this many evicted
          keys per tracked key (the paper sizes ghost like main, 90% of the cache);
      ``max_freq`` (1..15, default 3): the per-key frequency cap, i.e. reinsertions in main;
      ``promote_threshold`` (1..max_freq, default 1): hits needed in small to move to main.
    """

    __slots__ = (
        "small_ratio",
        "ghost_ratio",
        "max_freq",
        "promote_threshold",
        "_small",
        "_main",
        "_ghost",
        "_small_bytes",
        "_total_bytes",
        "_sim",
    )
    name = "s3fifo"

    def __init__(self, *, small_ratio: float = 0.1, ghost_ratio: float = 0.9, max_freq: int = 3, promote_threshold: int = 1) -> None:
        self.small_ratio = check_real("small_ratio", small_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
        self.ghost_ratio = check_real("ghost_ratio", ghost_ratio, low=0.0)
        self.max_freq = check_int("max_freq", max_freq, low=1, high=15)
        self.promote_threshold = check_int("promote_threshold", promote_threshold, low=1, high=self.max_freq)
        self._small: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest first
        self._ghost: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._small_bytes = 0
        self._total_bytes = 0
        self._sim: _Simulation | None = None  # memoised candidates(); None after any mutation

    # -- introspection (read-only) -------------------------------------------------------
    @property
    def num_small(self) -> int:
        return len(self._small)

    @property
    def num_main(self) -> int:
        return len(self._main)

    @property
    def num_ghost(self) -> int:
        return len(self._ghost)

    def queue_of(self, key: bytes) -> str | None:
        """``"small"``, ``"main"``, ``"ghost"`` (not tracked, but remembered) or None."""
        for name, queue in (("small", self._small), ("main", self._main), ("ghost", self._ghost)):
            if isinstance(key, bytes) and key in queue:
                return name
        return None

    # -- protocol --------------------------------------------------------------------------
    def on_insert(self, key: bytes, nbytes: int, *, depth: int = 0, tenant: str = "") -> None:
        check_insert(key, nbytes, depth, tenant)
        if key in self:
            self.on_access(key)
            return
        self._sim = None
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = _Entry(nbytes)
        else:
            self._small[key] = _Entry(nbytes)
            self._small_bytes += nbytes
        self._total_bytes += nbytes

    def on_access(self, key: bytes) -> None:
        if not isinstance(key, bytes):
            return
        e = self._small.get(key) or self._main.get(key)
        if e is not None and e.freq < self.max_freq:
            e.freq += 1
            self._sim = None

    def on_remove(self, key: bytes) -> None:
        if key not in self:
            return
        self._commit_moves()
        self._sim = None
        e = self._small.pop(key, None)
        if e is not None:
            self._small_bytes -= e.nbytes
            self._ghost[key] = None
            limit = self.ghost_ratio * len(self)  # len(self) no longer counts key
            while len(self._ghost) > limit:
                self._ghost.popitem(last=False)
        else:
            e = self._main.pop(key)
        self._total_bytes -= e.nbytes

    def _candidates(self, n: int) -> list[bytes]:
        sim = self._simulation()
        sim.advance(n)
        return sim.victims[:n]

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and (key in self._small or key in self._main)

    # -- the lazy half of the eviction loop ------------------------------------------------
    def _simulation(self) -> _Simulation:
        if self._sim is None:
            self._sim = _Simulation(self)
        return self._sim

    def _commit_moves(self) -> None:
        """Apply, for real, the promotions and reinsertions the loop makes before its first victim."""
        sim = self._simulation()
        sim.advance(1)
        if not sim.victims or not sim.moves_before[0]:
            return
        moves = sim.moves[: sim.moves_before[0]]
        self._sim = None  # its iterators must not be resumed over the mutated queues
        small, main = self._small, self._main
        for kind, key in moves:
            if kind == PROMOTE:
                e = small.pop(key)
                self._small_bytes -= e.nbytes
                e.freq = 0
                main[key] = e
            else:
                main.move_to_end(key)
                main[key].freq -= 1
