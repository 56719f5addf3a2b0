"""``kvtier demo``: a multi-turn session over one long document, on the reference model, through kvtier.

SCBench's shared-context setting: one document (English prose from the stdlib's pydoc topics,
about ``--tokens`` tokens, with one pass key per turn hidden at spread depths) and ``--turns``
questions asked in turn; each turn's prompt is the document followed by that turn's question
(token ids of the document, then of the question, so every turn shares the document's blocks).
Turn 1 finds nothing cached and prefills everything (time to first token *without* the cached
prefix), saving the document's full blocks; every later turn loads them and prefills only the
last partial block and its question (*with* the cached prefix).

The store is in process by default, built from the same settings as ``kvtier serve``
(``KVTIER_*`` variables, ``--config``) with its disk tier under a temporary ``--data-dir``;
``--service URL`` uses a running service through the SDK instead. Nothing is downloaded.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

from kvtier.connectors.generate import GenerateResult, generate

ROOMS = ("blue", "red", "green", "yellow", "white", "black", "orange", "purple")
MAX_TURNS = len(ROOMS)
MIN_TOKENS, MAX_TOKENS = 256, 32768


@dataclass(frozen=True)
class Session:
    document_ids: list[int] = field(repr=False)
    questions: list[str]
    answers: list[str]  # the pass key each question asks for

    def prompt_ids(self, tokenizer, turn: int) -> list[int]:
        """The document's ids, then the question's (so that every turn shares the document's blocks)."""
        return self.document_ids + tokenizer("\n\n" + self.questions[turn], add_special_tokens=False).input_ids


def build_session(tokenizer, num_tokens: int = 4096, num_turns: int = 4, seed: int = 0) -> Session:
    """A document of about ``num_tokens`` tokens with ``num_turns`` pass keys hidden in it, and the questions."""
    from .refmodel import heldout_text

    if not isinstance(num_tokens, int) or not MIN_TOKENS <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be an int in [{MIN_TOKENS}, {MAX_TOKENS}], got {num_tokens!r}")
    if not isinstance(num_turns, int) or not 1 <= num_turns <= MAX_TURNS:
        raise ValueError(f"turns must be an int in [1, {MAX_TURNS}], got {num_turns!r}")
    rng = random.Random(f"kvtier-demo/{seed}")
    rooms = ROOMS[:num_turns]
    keys = [str(rng.randint(10000, 99999)) for _ in rooms]
    facts = [f"The pass key of the {r} room is {k}. Remember it. {k} is the pass key of the {r} room." for r, k in zip(rooms, keys)]

    def count(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False).input_ids)

    budget = num_tokens - sum(count(f) + 2 for f in facts)
    paras: list[str] = []
    used = 0
    for p in heldout_text().split("\n\n"):
        n = count(p) + 2
        if used + n > budget:
            break
        paras.append(p)
        used += n
    for i, fact in enumerate(facts):  # turn i's key at depth (i + 0.5) / num_turns
        paras.insert(round(len(paras) * (i + 0.5) / len(facts)) + i, fact)
    document_ids = tokenizer("\n\n".join(paras), add_special_tokens=False).input_ids
    questions = [f"What is the pass key of the {r} room? The pass key of the {r} room is" for r in rooms]
    return Session(document_ids, questions, keys)


@dataclass
class Turn:
    index: int
    question: str
    expected: str
    result: GenerateResult
    baseline_ttft_s: float | None = None  # the same prompt without kvtier (--baseline)

    @property
    def correct(self) -> bool:
        return self.expected in (self.result.text or "").split(".")[0]


def run_session(
    model,
    tokenizer,
    session: Session,
    *,
    store=None,
    client=None,
    spec=None,
    max_new_tokens: int = 16,
    baseline: bool = False,
    progress: bool = True,
) -> list[Turn]:
    """Ask every question of ``session`` in turn through kvtier; with ``baseline`` also each without kvtier."""
    from tqdm import tqdm

    turns = []
    bar = tqdm(total=len(session.questions), desc="demo", unit="turn", file=sys.stderr, disable=not progress)
    try:
        for i, question in enumerate(session.questions):
            ids = session.prompt_ids(tokenizer, i)
            bar.set_description(f"turn {i + 1}: lookup, load, prefill {len(ids)} tokens")
            r = generate(
                model, ids, tokenizer=tokenizer, kv=store if store is not None else client, spec=spec, max_new_tokens=max_new_tokens
            )
            turn = Turn(i + 1, question, session.answers[i], r)
            if baseline:
                bar.set_description(f"turn {i + 1}: the same without kvtier")
                turn.baseline_ttft_s = generate(model, ids, tokenizer=tokenizer, max_new_tokens=1).ttft_s
            turns.append(turn)
            bar.set_postfix_str(f"TTFT {r.ttft_s:.2f} s, {r.num_cached_tokens} cached")
            bar.update()
    finally:
        bar.close()
    return turns


def cold_ttft(turns: list[Turn]) -> float | None:
    """TTFT without the cached prefix: turn 1's when it found nothing cached, else a baseline run's."""
    if turns and turns[0].result.num_cached_tokens == 0:
        return turns[0].result.ttft_s
    base = [t.baseline_ttft_s for t in turns if t.baseline_ttft_s is not None]
    return statistics.median(base) if base else None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def render(turns: list[Turn], tier_names: list[str], *, width: int = 40) -> str:
    """The final table: per turn the cached tokens, TTFT with and without the cached prefix, hits and MiB per tier, the answer."""
    cold = cold_ttft(turns)
    baseline = any(t.baseline_ttft_s is not None for t in turns)
    head = ["turn", "cached / prompt", "TTFT s"] + (["no cache s"] if baseline else []) + ["vs cold"]
    head += [f"{t} hits" for t in tier_names] + [f"{t} MiB" for t in tier_names] + ["answer", "ok"]
    rows = []
    for t in turns:
        r = t.result
        ref = t.baseline_ttft_s if t.baseline_ttft_s is not None else cold
        row = [str(t.index), f"{r.num_cached_tokens} / {r.num_prompt_tokens}", f"{r.ttft_s:.2f}"]
        if baseline:
            row.append(f"{t.baseline_ttft_s:.2f}" if t.baseline_ttft_s is not None else "-")
        row.append(f"{ref / r.ttft_s:.1f}x" if ref and r.num_cached_tokens else "cold")
        row += [str(r.tier_hits.get(n, 0)) for n in tier_names] + [_mib(r.tier_bytes.get(n, 0)) for n in tier_names]
        answer = (r.text or "").strip().replace("\n", " ")
        row += [answer if len(answer) <= width else answer[: width - 1] + "…", "yes" if t.correct else "no"]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    warm = [t.result.ttft_s for t in turns if t.result.num_cached_tokens]
    if cold and warm:
        w = statistics.median(warm)
        lines.append(
            f"\ntime to first token: {cold:.2f} s without the cached prefix, {w:.2f} s with it "
            f"(median of {len(warm)} turns): {cold / w:.1f}x faster"
        )
    saved = sum(t.result.cache.num_saved_blocks for t in turns if t.result.cache)
    lines.append(f"blocks saved: {saved}; answers right: {sum(t.correct for t in turns)} of {len(turns)}")
    return "\n".join(lines)


def check_args(args) -> str | None:
    """What is wrong with the demo's options (None: nothing), checked before the model loads."""
    if not MIN_TOKENS <= args.tokens <= MAX_TOKENS:
        return f"--tokens must be in [{MIN_TOKENS}, {MAX_TOKENS}], got {args.tokens}"
    if not 1 <= args.turns <= MAX_TURNS:
        return f"--turns must be in [1, {MAX_TURNS}], got {args.turns}"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"
    if args.threads < 1:
        return f"--threads must be at least 1, got {args.threads}"
    if args.block_tokens < 16 or args.block_tokens % 16 or args.block_tokens >= args.tokens:
        return f"--block-tokens must be a multiple of 16 below --tokens ({args.tokens}), got {args.block_tokens}"
    return None


def main(args) -> int:
    """``kvtier demo``: see the module docstring; ``args`` from the CLI's parser."""
    import torch

    from . import refmodel

    problem = check_args(args)
    if problem:
        print(f"kvtier demo: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"loading the reference model {refmodel.MODEL_ID} (from the installed package; nothing is downloaded) ...", file=sys.stderr)
    try:
        model, tokenizer = refmodel.load_model()
    except RuntimeError as e:
        print(f"kvtier demo: {e}", file=sys.stderr)
        return 2
    session = build_session(tokenizer, args.tokens, args.turns)
    spec = refmodel.kv_spec(model, block_tokens=args.block_tokens)
    store = client = None
    tmp = None
    if args.service:
        from kvtier.service.client import KVTierClient

        client = KVTierClient(args.service, api_key=args.api_key)
        where = f"the service at {args.service}"
    else:
        from kvtier.service.settings import Settings
        from kvtier.service.storebuild import build_store

        if args.data_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="kvtier-demo-")
            args.data_dir = tmp.name
        store = build_store(Settings(**{k: v for k, v in (("config", args.config), ("data_dir", args.data_dir)) if v is not None}))
        where = f"an in-process store ({', '.join(store.tier_names)}; data dir {args.data_dir})"
    print(
        f"{len(session.questions)} turns over a document of {len(session.document_ids)} tokens, blocks of "
        f"{spec.block_tokens} tokens ({spec.dtype}), through {where}; {args.threads} torch thread(s)",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    try:
        turns = run_session(
            model, tokenizer, session, store=store, client=client, spec=spec, max_new_tokens=args.max_new_tokens, baseline=args.baseline
        )
        if cold_ttft(turns) is None:  # turn 1 was warm (a previous run filled the store): measure one cold prefill
            turns[0].baseline_ttft_s = generate(model, session.prompt_ids(tokenizer, 0), tokenizer=tokenizer, max_new_tokens=1).ttft_s
        tiers = store.tier_names if store is not None else list(dict.fromkeys(k for t in turns for k in t.result.tier_hits))
    finally:
        if store is not None:
            store.close()
        if client is not None:
            client.close()
        if tmp is not None:
            tmp.cleanup()
    print(render(turns, tiers))
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    return 0
