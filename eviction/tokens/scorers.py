"""The built-in scorers. Each is a few lines of maths over ``ScoreInputs``; see ``base`` for the contract.

| name | keeps | needs queries |
|---|---|---|
| ``streaming_llm`` | the most recent tokens (StreamingLLM; the sinks come from the compressor) | no |
| ``knorm`` | keys of small L2 norm (low-norm keys draw attention) | no |
| ``snapkv`` | tokens the observation window attends to, pooled over neighbours (SnapKV) | yes |
| ``pyramidkv`` | SnapKV's choice, with budgets that shrink with depth (PyramidKV) | yes |
| ``tova`` | tokens the last query attends to, averaged over the layer's heads (TOVA) | yes |
| ``h2o`` | tokens with the largest attention accumulated over every query seen (H2O) | yes |
| ``expected_attention`` | tokens of high expected attention under a Gaussian model of the window's queries, times ‖v‖ | yes (no attention weights) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import ScoreInputs, ScorerBase, check_int, check_real, group_mean, register_scorer, window_attention


@register_scorer
@dataclass
class StreamingLLMScorer(ScorerBase):
    """Position: the newest token scores highest. With the compressor's sinks this is StreamingLLM."""

    name = "streaming_llm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        B, H_kv, T = inputs.batch, inputs.num_kv_heads, inputs.num_tokens
        pos = torch.arange(T, dtype=torch.float32, device=inputs.keys.device)
        return pos.expand(B, H_kv, T).clone()


@register_scorer
@dataclass
class KeyNormScorer(ScorerBase):
    """``-‖k‖₂``: keys of small norm are the ones attention concentrates on (Devoto et al., 2024)."""

    name = "knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -torch.linalg.vector_norm(inputs.keys.float(), dim=-1)


@register_scorer
@dataclass
class SnapKVScorer(ScorerBase):
    """Attention of the observation window, averaged over its queries, smoothed by a 1-D average
    pool of ``kernel_size`` tokens (SnapKV keeps clusters, not isolated tokens), averaged over the
    query heads of each KV group."""

    name = "snapkv"
    kernel_size: int = 5

    def __post_init__(self) -> None:
        check_int("kernel_size", self.kernel_size, low=1, high=255)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the pool is centred), got {self.kernel_size}")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        q = inputs.need_queries(self.name)
        attn = window_attention(q, inputs.keys, inputs.lengths).mean(dim=2)  # [B, H_q, T]
        if self.kernel_size > 1:
            attn = F.avg_pool1d(attn, self.kernel_size, stride=1, padding=self.kernel_size // 2, count_include_pad=False)
        return group_mean(attn, inputs.num_kv_heads)


@register_scorer
@dataclass
class PyramidKVScorer(SnapKVScorer):
    """SnapKV scores with layer budgets decreasing linearly with depth (PyramidKV): the first layer
    keeps ``2b - b/beta`` tokens, the last ``b/beta``, the mean over layers stays ``b``."""

    name = "pyramidkv"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("beta", self.beta, low=1.0, high=1e6)

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int:
        if num_layers == 1:
            return budget
        low = budget / self.beta
        high = 2 * budget - low
        return max(1, round(high - (high - low) * layer / (num_layers - 1)))


@register_scorer
@dataclass
class TOVAScorer(ScorerBase):
    """The attention of the LAST query only (TOVA: the current token votes).

    ``heads="layer"`` (the paper's recipe, and kvpress's): averaged over every query head of the
    layer, so all KV heads keep the same tokens; ``heads="group"``: averaged over the query heads
    of each KV group, a selection per KV head.
    """

    name = "tova"
    heads: str = "layer"

    def __post_init__(self) -> None:
        if self.heads not in ("layer", "group"):
            raise ValueError(f"heads must be 'layer' or 'group', got {self.heads!r}")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        q = inputs.need_queries(self.name)[:, :, -1:]
        attn = window_attention(q, inputs.keys, inputs.lengths)[:, :, 0]  # [B, H_q, T]
        if self.heads == "group":
            return group_mean(attn, inputs.num_kv_heads)
        return attn.mean(dim=1, keepdim=True).expand(-1, inputs.num_kv_heads, -1).contiguous()


@register_scorer
@dataclass
class H2OScorer(ScorerBase):
    """Heavy hitters (H2O): the attention each token has received, summed over every query seen.

    Stateful, one accumulator per layer aligned with the cache's token axis: each call adds the
    attention of the queries it is given (the tokens that arrived since the previous call, e.g.
    a prefill chunk or one decode step) and extends the accumulator for new tokens.
    ``on_compress`` keeps the accumulator of the surviving tokens only.
    """

    name = "h2o"
    _acc: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        q = inputs.need_queries(self.name)
        new = group_mean(window_attention(q, inputs.keys, inputs.lengths).sum(dim=2), inputs.num_kv_heads)  # [B, H_kv, T]
        acc = self._acc.get(inputs.layer)
        if acc is not None:
            if acc.shape[:2] != new.shape[:2] or acc.shape[2] > new.shape[2]:
                raise ValueError(
                    f"h2o state of layer {inputs.layer} has shape {list(acc.shape)}, which does not "
                    f"prefix the cache {list(new.shape)}: call reset() between sequences"
                )
            new[..., : acc.shape[2]] += acc
        self._acc[inputs.layer] = new
        return new.clone()

    def on_compress(self, layer: int, kept: torch.Tensor) -> None:
        acc = self._acc.get(layer)
        if acc is None:
            return
        gathered = acc.gather(2, kept.clamp(min=0))
        self._acc[layer] = gathered.masked_fill_(kept < 0, 0.0)

    def reset(self) -> None:
        self._acc.clear()


@register_scorer
@dataclass
class ExpectedAttentionScorer(ScorerBase):
    """Expected attention without attention weights (after kvpress's Expected Attention).

    The queries to come are modelled as a Gaussian fitted, per query head, to the observation
    window's queries (mean ``mu``, covariance ``S``); the expected softmax logit of key ``k`` is
    ``E[exp(q·k/√d)] = exp(mu·k/√d + kᵀSk/(2d))``. Scores are those expectations normalised over
    the tokens, times ``‖v‖`` (a token that is attended but carries a tiny value changes little),
    averaged over the query heads of each KV group. ``cov=False`` drops the covariance term.
    """

    name = "expected_attention"
    cov: bool = True
    epsilon: float = 1e-2

    def __post_init__(self) -> None:
        if not isinstance(self.cov, bool):
            raise ValueError(f"cov must be a bool, got {self.cov!r}")
        check_real("epsilon", self.epsilon, low=0.0, high=1.0)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        q = inputs.need_queries(self.name).float()  # [B, H_q, W, D]
        B, H_q, W, D = q.shape
        H_kv = inputs.num_kv_heads
        k = inputs.keys.float().repeat_interleave(H_q // H_kv, dim=1)  # [B, H_q, T, D]
        mu = q.mean(dim=2)  # [B, H_q, D]
        logits = torch.einsum("bhd,bhtd->bht", mu, k) / math.sqrt(D)
        if self.cov and W > 1:
            qc = q - mu.unsqueeze(2)
            cov = torch.einsum("bhwd,bhwe->bhde", qc, qc) / (W - 1)  # [B, H_q, D, D]
            logits = logits + torch.einsum("bhtd,bhde,bhte->bht", k, cov, k) / (2 * D)
        if inputs.lengths is not None:  # padding slots get no expected attention
            logits = logits.masked_fill(~inputs.valid().repeat_interleave(H_q // H_kv, dim=1), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        vnorm = torch.linalg.vector_norm(inputs.values.float(), dim=-1).repeat_interleave(H_q // H_kv, dim=1)
        return group_mean((probs + self.epsilon / probs.shape[-1]) * vnorm, H_kv)
