"""One sequence's KV cache under a fast-tier token budget: ``drop`` or ``demote`` mode.

``EvictingKV`` holds, per layer, the tokens on the fast tier (``[H_kv, slots, D]``, each head's
tokens first, padding after them) and, in ``demote`` mode, the evicted tokens on a lower tier
(``demote_device``, host memory by default). An engine feeds it each layer's new queries, keys and
values and gets the attention output back::

    kv = EvictingKV(Compressor("snapkv", budget=1024), num_layers=30, mode="demote",
                    recall=get_selector("ann", num_sink=0, num_recent=0), recall_budget=256)
    o = kv.step(layer, q, k, v)          # q [H_q, n, D], k/v [H_kv, n, D] (after RoPE) -> o [H_q, n, D]
    kv.compress()                        # or automatically: trigger_tokens=...

- ``step`` appends the ``n`` new tokens, computes causal attention of their queries over the
  fast tier and, in ``demote`` mode, over the demoted tokens that a selector recalls for each query
  (``recall_budget`` per KV head; ``sparse_decode`` over exactly those, merged by LSE with
  ``merge_states``), then compresses when a head holds more than ``trigger_tokens``.
- ``compress`` runs the compressor on every layer (or one), its observation window being the last
  ``observation_window`` queries seen. In ``drop`` mode the evicted tokens are gone, as with
  kvpress; in ``demote`` mode they move to the lower tier and stay retrievable.

Eviction during a chunked prefill (``trigger_tokens`` set) means a long prompt never holds more than
``trigger_tokens + chunk`` tokens per head on the fast tier; during decode, ``trigger_tokens =
budget + period`` compresses every ``period`` tokens. Batch size 1 (one sequence); the demoted
store is bounded by ``max_demoted_tokens`` per head (the oldest go first, counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .base import ScoreInputs, check_int
from .compress import Compressor


class RecallSelector(Protocol):
    """What ``retrieval.get_selector(...)`` returns: token ids per KV head for decode queries."""

    def prepare(self, k: torch.Tensor, prefill_q: torch.Tensor | None = None) -> Any: ...

    def select(self, q: torch.Tensor, k: torch.Tensor, budget: int, state: Any = None) -> torch.Tensor: ...


@dataclass
class _Layer:
    k: torch.Tensor  # [H_kv, cap, D] fast tier
    v: torch.Tensor
    pos: torch.Tensor  # [H_kv, cap] token positions
    n: torch.Tensor  # [H_kv] valid slots per head
    q_win: torch.Tensor  # [H_q, <= W, D] the last queries
    dk: torch.Tensor  # [H_kv, dcap, D] demoted (lower tier)
    dv: torch.Tensor
    dpos: torch.Tensor  # [H_kv, dcap]
    dn: torch.Tensor  # [H_kv]
    recall_state: Any = None
    recall_version: int = -1
    version: int = 0  # bumped whenever the demoted set changes
    # False while every change since the recall state was built appended the same number of tokens to
    # every head (no padding slot was indexed, nothing removed): the selector then extends its state
    # (new pages, new index rows) instead of rebuilding it over every demoted token
    recall_stale: bool = False


@dataclass
class EvictionStats:
    compressions: int = 0
    evicted_tokens: int = 0  # summed over layers and heads
    demoted_tokens: int = 0
    dropped_from_lower_tier: int = 0  # demoted tokens beyond max_demoted_tokens
    recalled_tokens: int = 0  # summed over layers, queries and heads
    recall_builds: int = 0  # recall states built from scratch (else extended with the newly demoted tokens)


class EvictingKV:
    def __init__(
        self,
        compressor: Compressor,
        *,
        num_layers: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mode: str = "drop",
        observation_window: int = 64,
        trigger_tokens: int | None = None,
        recall: RecallSelector | None = None,
        recall_budget: int = 256,
        demote_device: str | torch.device = "cpu",
        max_demoted_tokens: int = 1 << 20,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(compressor, Compressor):
            raise ValueError(f"compressor must be a Compressor, got {type(compressor).__name__}")
        if mode not in ("drop", "demote"):
            raise ValueError(f"mode must be 'drop' or 'demote', got {mode!r}")
        check_int("num_layers", num_layers, low=1)
        check_int("num_kv_heads", num_kv_heads, low=1)
        check_int("num_q_heads", num_q_heads, low=1)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_int("head_dim", head_dim, low=1)
        check_int("observation_window", observation_window, low=1)
        if trigger_tokens is not None:
            check_int("trigger_tokens", trigger_tokens, low=1)
        check_int("recall_budget", recall_budget, low=1)
        check_int("max_demoted_tokens", max_demoted_tokens, low=1)
        if mode == "demote" and recall is None:
            raise ValueError("demote mode needs a recall selector (e.g. retrieval.get_selector('ann', num_sink=0, num_recent=0))")
        self.compressor = compressor
        self.mode = mode
        self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim = num_layers, num_q_heads, num_kv_heads, head_dim
        self.observation_window = observation_window
        self.trigger_tokens = trigger_tokens
        self.recall = recall
        self.recall_budget = recall_budget
        self.demote_device = torch.device(demote_device)
        self.max_demoted_tokens = max_demoted_tokens
        self.dtype, self.device = dtype, torch.device(device)
        self.stats = EvictionStats()
        self._layers = [self._empty_layer() for _ in range(num_layers)]
        self._seen = [0] * num_layers  # tokens seen per layer (the next token's position)

    # -- state ---------------------------------------------------------------------------------
    def _empty_layer(self) -> _Layer:
        H, Hq, D = self.num_kv_heads, self.num_q_heads, self.head_dim
        z = lambda *s, dev=self.device, dt=self.dtype: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
        zl = lambda *s, dev=self.device: torch.zeros(*s, dtype=torch.int64, device=dev)  # noqa: E731
        dd = self.demote_device
        return _Layer(
            z(H, 0, D), z(H, 0, D), zl(H, 0), zl(H), z(Hq, 0, D), z(H, 0, D, dev=dd), z(H, 0, D, dev=dd), zl(H, 0, dev=dd), zl(H, dev=dd)
        )

    def fast_tokens(self, layer: int) -> list[int]:
        """Tokens per KV head on the fast tier."""
        return self._layers[layer].n.tolist()

    def demoted_tokens(self, layer: int) -> list[int]:
        return self._layers[layer].dn.tolist()

    def fast_positions(self, layer: int, head: int) -> torch.Tensor:
        lay = self._layers[layer]
        return lay.pos[head, : int(lay.n[head])].clone()

    def demoted_kv(self, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions [E], keys [E, D], values [E, D])`` of one head's demoted tokens."""
        lay = self._layers[layer]
        e = int(lay.dn[head])
        return lay.dpos[head, :e].clone(), lay.dk[head, :e].clone(), lay.dv[head, :e].clone()

    # -- the engine's calls ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append ``n`` tokens to ``layer`` and return their attention output ``[H_q, n, D]``."""
        self._check_step(layer, q, k, v)
        self._append(layer, q, k, v)
        o, lse = self._attend_fast(layer, q)
        if self.mode == "demote" and int(self._layers[layer].dn.max()) > 0:
            from kvtier.sparse_attn import merge_states  # imported here: eviction needs sparse_attn only for recall

            o_r, lse_r = self._attend_recalled(layer, q)
            o, lse = merge_states(o, lse, o_r, lse_r)
        if self.trigger_tokens is not None and int(self._layers[layer].n.max()) > self.trigger_tokens:
            self.compress(layer)
        return o.to(q.dtype)

    @torch.inference_mode()
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """Add ``n`` tokens ``k``/``v`` ``[H_kv, n, D]`` to ``layer`` without attending (a prefix loaded
        from the store, or a cache an engine prefilled itself); ``q`` ``[H_q, m, D]`` are the queries
        of the last ``m <= n`` of them, for the observation window. No automatic compression."""
        check_int("layer", layer, low=0, high=self.num_layers - 1)
        n = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 3 else -1
        qq = q if q is not None else torch.zeros(self.num_q_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
        if qq.dim() != 3 or qq.shape[1] > max(n, 0):
            raise ValueError(f"q must be [{self.num_q_heads}, m <= n, {self.head_dim}] for n = {n} tokens, got {list(qq.shape)}")
        self._check_step(layer, torch.zeros(self.num_q_heads, max(n, 0), self.head_dim), k, v)
        self._check_step(layer, qq, k[:, k.shape[1] - qq.shape[1] :], v[:, v.shape[1] - qq.shape[1] :])
        with torch.inference_mode():
            self._append(layer, qq, k, v)

    @torch.inference_mode()
    def compress(self, layer: int | None = None) -> None:
        """Run the compressor now on ``layer`` (every layer when ``None``)."""
        for i in range(self.num_layers) if layer is None else [check_int("layer", layer, low=0, high=self.num_layers - 1)]:
            self._compress_layer(i)

    # -- internals --------------------------------------------------------------------------------
    def _check_step(self, layer, q, k, v) -> None:
        check_int("layer", layer, low=0, high=self.num_layers - 1)
        Hq, H, D = self.num_q_heads, self.num_kv_heads, self.head_dim
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[0] != Hq or q.shape[2] != D:
            raise ValueError(f"q must be [{Hq}, n, {D}], got {list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        n = q.shape[1]
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (H, n, D):
                raise ValueError(
                    f"{name} must be [{H}, {n}, {D}], got {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                )

    def _append(self, layer: int, q, k, v) -> None:
        """Append k/v ``[H, n, D]``; ``q`` ``[H_q, m, D]`` are the queries of the last ``m`` of them."""
        lay = self._layers[layer]
        H, n = self.num_kv_heads, k.shape[1]
        need = int(lay.n.max()) + n
        if need > lay.k.shape[1]:  # grow the slot axis (amortised doubling)
            cap = max(need, 2 * lay.k.shape[1], 64)
            lay.k = _grow(lay.k, cap)
            lay.v = _grow(lay.v, cap)
            lay.pos = _grow(lay.pos, cap)
        slots = lay.n.view(H, 1) + torch.arange(n, device=self.device).view(1, n)  # [H, n]
        heads = torch.arange(H, device=self.device).view(H, 1)
        lay.k[heads, slots] = k.to(self.dtype)
        lay.v[heads, slots] = v.to(self.dtype)
        lay.pos[heads, slots] = torch.arange(self._seen[layer], self._seen[layer] + n, device=self.device).view(1, n)
        lay.n += n
        self._seen[layer] += n
        lay.q_win = torch.cat((lay.q_win, q.to(self.dtype)), dim=1)[:, -self.observation_window :]

    def _attend_fast(self, layer: int, q: torch.Tensor, query_chunk: int = 256):
        """Causal attention of the ``n`` newest tokens' queries over the fast tier: (o, lse)."""
        lay = self._layers[layer]
        H, Hq, D = self.num_kv_heads, self.num_q_heads, self.head_dim
        n, S = q.shape[1], int(lay.n.max())
        g = Hq // H
        # grouped: the g query heads of a KV head attend its keys in one matmul (no copy of K/V per query head)
        k = lay.k[:, :S].float()  # [H_kv, S, D]
        v = lay.v[:, :S].float()
        n_head = lay.n.repeat_interleave(g).view(Hq, 1, 1)
        slot = torch.arange(S, device=self.device).view(1, 1, S)
        scale = 1.0 / math.sqrt(D)
        outs, lses = [], []
        for a in range(0, n, query_chunk):
            qc = q[:, a : a + query_chunk].float()  # [H_q, c, D]
            c = qc.shape[1]
            limit = n_head - n + a + torch.arange(1, c + 1, device=self.device).view(1, c, 1)  # sees slots < limit
            logits = torch.matmul(qc.reshape(H, g * c, D), k.transpose(1, 2)).view(Hq, c, S)
            logits.mul_(scale).masked_fill_(slot >= limit, float("-inf"))
            lse = torch.logsumexp(logits, dim=-1)  # [H_q, c]
            probs = torch.exp(logits - lse.unsqueeze(-1)).view(H, g * c, S)
            outs.append(torch.matmul(probs, v).view(Hq, c, D))
            lses.append(lse)
        o = torch.cat(outs, dim=1)  # [H_q, n, D]
        return o, torch.cat(lses, dim=1)

    def _attend_recalled(self, layer: int, q: torch.Tensor):
        """Attention of each new query over the demoted tokens its selector recalls: (o, lse) ``[n, H_q, ·]``."""
        from kvtier.sparse_attn import sparse_decode

        recall = self.recall
        assert recall is not None  # demote mode has a recall selector (checked in __init__)
        lay = self._layers[layer]
        H = self.num_kv_heads
        E = int(lay.dn.max())
        dk = lay.dk[:, :E].unsqueeze(0)  # [1, H, E, D] on the lower tier
        if lay.recall_state is None or (lay.recall_version != lay.version and lay.recall_stale):
            lay.recall_state = recall.prepare(dk.float())
            self.stats.recall_builds += 1
        lay.recall_version, lay.recall_stale = lay.version, False  # select() extends the state to the new tokens
        qn = q.transpose(0, 1).to(self.demote_device).float()  # [n, H_q, D]
        ids = recall.select(qn, dk.float(), min(self.recall_budget, E), lay.recall_state)  # [n, H, R]
        ids = torch.where(ids >= lay.dn.view(1, H, 1), -1, ids)  # padding slots of shorter heads
        R = ids.shape[2]
        # fetch only the recalled tokens to the compute device
        safe = ids.clamp(min=0)
        heads = torch.arange(H, device=self.demote_device).view(1, H, 1)
        k_sel = lay.dk[heads, safe].to(self.device, self.dtype)  # [n, H, R, D]
        v_sel = lay.dv[heads, safe].to(self.device, self.dtype)
        local = torch.where(ids >= 0, torch.arange(R, device=self.demote_device).view(1, 1, R), -1).to(self.device)
        self.stats.recalled_tokens += int((ids >= 0).sum())
        o, lse = sparse_decode(q.transpose(0, 1).to(self.dtype).contiguous(), k_sel, v_sel, local)
        return o.float().transpose(0, 1), lse.transpose(0, 1)  # [H_q, n, D], [H_q, n]

    def _compress_layer(self, i: int) -> None:
        lay = self._layers[i]
        S = int(lay.n.max())
        if S == 0:
            return
        W = min(lay.q_win.shape[1], int(lay.n.min()))
        inputs = ScoreInputs(
            lay.k[:, :S].unsqueeze(0),
            lay.v[:, :S].unsqueeze(0),
            lay.q_win[:, lay.q_win.shape[1] - W :].unsqueeze(0) if W else None,
            layer=i,
            num_layers=self.num_layers,
            lengths=lay.n.view(1, -1),
        )
        kept = self.compressor.keep(inputs)[0]  # [H, K], -1 padding
        H, K = kept.shape
        if bool(((kept >= 0).sum(-1) == lay.n).all()):
            return  # nothing to evict
        keep_mask = torch.zeros(H, S + 1, dtype=torch.bool, device=self.device)
        keep_mask.scatter_(1, torch.where(kept < 0, S, kept), True)
        keep_mask = keep_mask[:, :S] & (torch.arange(S, device=self.device).view(1, S) < lay.n.view(H, 1))
        evict_mask = (torch.arange(S, device=self.device).view(1, S) < lay.n.view(H, 1)) & ~keep_mask
        self.stats.compressions += 1
        self.stats.evicted_tokens += int(evict_mask.sum())
        if self.mode == "demote":
            self._demote(lay, evict_mask)
        new_n = keep_mask.sum(-1)
        order = torch.argsort((~keep_mask).to(torch.int8), dim=1, stable=True)[:, : max(int(new_n.max()), 0)]
        for name in ("k", "v"):
            t = getattr(lay, name)
            idx = order.unsqueeze(-1).expand(H, order.shape[1], self.head_dim)
            setattr(lay, name, _with_capacity(t.gather(1, idx), t.shape[1]))
        lay.pos = _with_capacity(lay.pos.gather(1, order), lay.pos.shape[1])
        lay.n = new_n

    def _demote(self, lay: _Layer, evict_mask: torch.Tensor) -> None:
        H, S = evict_mask.shape
        counts = evict_mask.sum(-1)
        E_new = int(counts.max())
        if E_new == 0:
            return
        order = torch.argsort((~evict_mask).to(torch.int8), dim=1, stable=True)[:, :E_new]  # evicted first, by slot
        valid = torch.arange(E_new, device=self.device).view(1, E_new) < counts.view(H, 1)
        idx = order.unsqueeze(-1).expand(H, E_new, self.head_dim)
        ek = lay.k[:, :S].gather(1, idx).to(self.demote_device)
        ev = lay.v[:, :S].gather(1, idx).to(self.demote_device)
        ep = lay.pos[:, :S].gather(1, order).to(self.demote_device)
        dn = lay.dn.clone()
        if not (bool((dn == dn[0]).all()) and bool((counts == counts[0]).all())):
            lay.recall_stale = True  # ragged heads: padding slots were indexed, new tokens land in them
        need = int((dn + counts.to(self.demote_device)).max())
        if need > lay.dk.shape[1]:
            cap = max(need, 2 * lay.dk.shape[1], 64)
            lay.dk, lay.dv, lay.dpos = _grow(lay.dk, cap), _grow(lay.dv, cap), _grow(lay.dpos, cap)
        slots = dn.view(H, 1) + torch.arange(E_new, device=self.demote_device).view(1, E_new)
        valid_d = valid.to(self.demote_device)
        heads = torch.arange(H, device=self.demote_device).view(H, 1).expand(H, E_new)
        lay.dk[heads[valid_d], slots[valid_d]] = ek[valid_d]
        lay.dv[heads[valid_d], slots[valid_d]] = ev[valid_d]
        lay.dpos[heads[valid_d], slots[valid_d]] = ep[valid_d]
        lay.dn = dn + counts.to(self.demote_device)
        self.stats.demoted_tokens += int(counts.sum())
        over = int(lay.dn.max()) - self.max_demoted_tokens
        if over > 0:  # bounded lower tier: the oldest demoted tokens leave for good
            for h in range(H):
                extra = int(lay.dn[h]) - self.max_demoted_tokens
                if extra > 0:
                    e = int(lay.dn[h])
                    for t in (lay.dk, lay.dv, lay.dpos):
                        t[h, : e - extra] = t[h, extra:e].clone()
                    lay.dn[h] -= extra
                    self.stats.dropped_from_lower_tier += extra
            lay.recall_stale = True
        lay.version += 1


def _grow(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros(t.shape[0], cap, *t.shape[2:], dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


def _with_capacity(t: torch.Tensor, cap: int) -> torch.Tensor:
    return t if t.shape[1] >= cap else _grow(t, cap)
