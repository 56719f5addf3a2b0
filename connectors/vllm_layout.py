"""vLLM's paged KV <-> kvtier blocks: the K/V split of each attention backend, views, gathers and scatters.

vLLM 0.32 allocates a layer as a logical ``[N, H_kv, P, 2 * D]`` tensor whose K/V split depends on
the attention backend (``BACKEND_LAYOUTS``); ``paged_view`` turns any known layout into a
``[2, N, P, H_kv, D]`` view of vLLM's buffer, ``gather_layer`` / ``scatter_layer`` move one layer of
kvtier blocks ``[n, 2, H_kv, r * P, D]`` out of and into it, and ``kernel_block_ids`` maps vLLM
blocks to the kernel blocks that hold them. No vLLM import: the connector (``connectors.vllm``,
which re-exports every name here) and its tests use it, and so can another engine's adapter with
the same layouts.
"""

from __future__ import annotations

from typing import Sequence

import torch

# How vLLM lays out one attention layer's paged KV, by attention backend (``AttentionBackend.get_name()``).
# vLLM >= 0.2x allocates a layer as a logical 4-d ``[N, H_kv, P, 2 * D]`` view (its physical stride
# order is the resolved ``KVCacheLayout``; torch indexing follows the strides). The backends split it
# into K and V in two different ways, which the shape cannot tell apart:
#
# - ``kv_in_content``: K and V side by side in the last dim, ``kv[..., :D]`` and ``kv[..., D:]``
#   (FlashAttention, FlashInfer, Triton: ``kv.transpose(1, 2).split(head_size, -1)``);
# - ``kv_in_rows``: each (block, head) slab of ``P * 2D`` values read as ``[2P, D]`` rows, all K rows
#   then all V rows (the CPU backend: ``kv.view(N, H, 2P, D).chunk(2, dim=2)``), which needs the slab
#   to be contiguous.
#
# Older vLLM allocated 5-d tensors: ``kv_first`` ``[2, N, P, H_kv, D]`` and ``blocks_first``
# ``[N, 2, P, H_kv, D]``. Any other backend stops the engine at start (``paged_layout`` names one
# of these explicitly for a backend known to match it).
BACKEND_LAYOUTS = {
    "CPU_ATTN": "kv_in_rows",
    "FLASH_ATTN": "kv_in_content",
    "FLASHINFER": "kv_in_content",
    "TRITON_ATTN": "kv_in_content",
}
LAYOUTS_5D = ("kv_first", "blocks_first")
LAYOUTS_4D = ("kv_in_content", "kv_in_rows")


def detect_layout(kv_layer: torch.Tensor, backend_name: str | None = None) -> str:
    """The paged layout of one layer: from its attention backend (4-d) or its shape (5-d); ValueError otherwise."""
    shape = list(kv_layer.shape)
    if kv_layer.dim() == 4:
        layout = BACKEND_LAYOUTS.get(backend_name or "")
        if layout is None:
            raise ValueError(
                f"the kvtier connector does not know how attention backend {backend_name!r} splits its paged KV "
                f"{shape} into K and V (known: {sorted(BACKEND_LAYOUTS)}); set kv_connector_extra_config "
                f"paged_layout to one of {list(LAYOUTS_4D)} only if the backend matches it"
            )
        return layout
    if kv_layer.dim() != 5:
        raise ValueError(
            f"a paged KV layer must be 4-d [N, H_kv, P, 2*D] or 5-d ([2, N, P, H_kv, D] or [N, 2, P, H_kv, D]), got shape {shape}"
        )
    first, second = kv_layer.shape[0] == 2, kv_layer.shape[1] == 2
    if first != second:
        return "kv_first" if first else "blocks_first"
    raise ValueError(f"cannot tell the paged layout of shape {shape}: set paged_layout to 'kv_first' or 'blocks_first'")


def paged_view(kv_layer: torch.Tensor, layout: str) -> torch.Tensor:
    """One layer of vLLM's paged KV as ``[2, N, P, H_kv, D]``: a view, so writes reach vLLM's buffer."""
    shape = list(kv_layer.shape)
    if layout in LAYOUTS_4D:
        if kv_layer.dim() != 4 or kv_layer.shape[-1] % 2:
            raise ValueError(f"a {layout} paged layer is [N, H_kv, P, 2*D], got shape {shape}")
        N, H, P, C = kv_layer.shape
        D = C // 2
        if kv_layer.stride(-1) != 1:
            raise ValueError(f"a {layout} paged layer needs a contiguous last dim, got strides {list(kv_layer.stride())}")
        if layout == "kv_in_content":
            return kv_layer.unflatten(-1, (2, D)).permute(3, 0, 2, 1, 4)  # [N, H, P, 2, D] -> [2, N, P, H, D]
        if kv_layer.stride(2) != C:
            raise ValueError(
                f"a kv_in_rows paged layer needs each (block, head) slab [P, 2*D] contiguous, got strides "
                f"{list(kv_layer.stride())} for shape {shape}"
            )
        s0, s1 = kv_layer.stride(0), kv_layer.stride(1)
        rows = kv_layer.as_strided((N, H, 2, P, D), (s0, s1, P * D, D, 1), kv_layer.storage_offset())  # [N, H, 2, P, D]
        return rows.permute(2, 0, 3, 1, 4)
    if layout in LAYOUTS_5D:
        if kv_layer.dim() != 5:
            raise ValueError(f"a {layout} paged layer is 5-d, got shape {shape}")
        if layout == "kv_first":
            if kv_layer.shape[0] != 2:
                raise ValueError(f"a kv_first paged layer is [2, N, P, H_kv, D], got shape {shape}")
            return kv_layer
        if kv_layer.shape[1] != 2:
            raise ValueError(f"a blocks_first paged layer is [N, 2, P, H_kv, D], got shape {shape}")
        return kv_layer.transpose(0, 1)
    raise ValueError(f"layout must be one of {list(LAYOUTS_4D + LAYOUTS_5D)}, got {layout!r}")


def kernel_block_ids(block_ids: torch.Tensor, k: int) -> torch.Tensor:
    """vLLM blocks ``[n, r]`` as the ``[n, r * k]`` kernel blocks that hold them (block b is kernel blocks
    ``b * k .. b * k + k - 1``: vLLM splits a block into k when the backend needs smaller ones); -1 stays -1."""
    if k == 1:
        return block_ids
    n, r = block_ids.shape
    ids = block_ids.unsqueeze(-1) * k + torch.arange(k, dtype=block_ids.dtype)  # [n, r, k]
    return torch.where(block_ids.unsqueeze(-1) >= 0, ids, torch.full_like(ids, -1)).reshape(n, r * k)


def gather_layer(view: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """One layer of n kvtier blocks from the paged KV.

    view: ``[2, N, P, H_kv, D]`` (``paged_view``); block_ids: int64 ``[n, r]``, the r vLLM blocks
    of each kvtier block in token order. Returns ``[n, 2, H_kv, r * P, D]`` (a new tensor on view's device).
    """
    n, r = block_ids.shape
    _, _, P, H, D = view.shape
    x = view[:, block_ids.reshape(-1).to(view.device)]  # [2, n*r, P, H, D]
    return x.view(2, n, r, P, H, D).permute(1, 0, 4, 2, 3, 5).reshape(n, 2, H, r * P, D)


def scatter_layer(view: torch.Tensor, src: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Write one layer of n kvtier blocks into the paged KV (the inverse of ``gather_layer``).

    view: ``[2, N, P, H_kv, D]``; src: ``[n, 2, H_kv, r * P, D]`` (any device, view's dtype);
    block_ids: int64 ``[n, r]``, ``-1`` for a vLLM block to leave as it is.
    """
    n, r = block_ids.shape
    _, _, P, H, D = view.shape
    if tuple(src.shape) != (n, 2, H, r * P, D):
        raise ValueError(f"src must be [{n}, 2, {H}, {r * P}, {D}] for these block ids, got {list(src.shape)}")
    if src.dtype != view.dtype:
        raise ValueError(f"src dtype {src.dtype} differs from the paged KV's {view.dtype}")
    y = src.to(view.device, non_blocking=True).reshape(n, 2, H, r, P, D).permute(1, 0, 3, 4, 2, 5).reshape(2, n * r, P, H, D)
    flat = block_ids.reshape(-1)
    keep = flat >= 0
    if bool(keep.all()):
        view[:, flat.to(view.device)] = y
    else:
        view[:, flat[keep].to(view.device)] = y[:, keep.to(view.device)]


def paged_to_blocks(kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, layout: str = "kv_first") -> torch.Tensor:
    """kvtier blocks ``[n, L, 2, H_kv, r * P, D]`` gathered from L paged layers at ``block_ids [n, r]``."""
    return torch.stack([gather_layer(paged_view(kv, layout), block_ids) for kv in kv_layers], dim=1)


def blocks_to_paged(blocks: torch.Tensor, kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, layout: str = "kv_first") -> None:
    """Scatter kvtier blocks ``[n, L, 2, H_kv, r * P, D]`` into L paged layers at ``block_ids [n, r]`` (-1: skip)."""
    if blocks.dim() != 6 or blocks.shape[1] != len(kv_layers):
        raise ValueError(f"blocks must be [n, {len(kv_layers)}, 2, H_kv, T, D] for {len(kv_layers)} layers, got {list(blocks.shape)}")
    for l, kv in enumerate(kv_layers):
        scatter_layer(paged_view(kv, layout), blocks[:, l], block_ids)
