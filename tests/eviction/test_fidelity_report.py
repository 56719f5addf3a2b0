"""bench/fidelity.py's report: the paired comparison and the Markdown come from the saved runs alone."""

from __future__ import annotations

from bench import fidelity


def _run(method, ratio, tokens, depth, key, ok):
    return {"method": method, "ratio": ratio, "tokens": tokens, "depth": depth, "key": key, "answer": key if ok else "x", "correct": ok}


def _runs():
    prompts = [(2000, 0.1, "11111"), (2000, 0.9, "22222"), (6000, 0.5, "33333")]
    ours = {0.5: [True, True, False], 0.9: [False, False, False]}
    theirs = {0.5: [True, False, True], 0.9: [True, False, False]}
    rows = []
    for i, (t, d, k) in enumerate(prompts):
        rows.append(_run("full", 0.0, t, d, k, True))
        for r in (0.5, 0.9):
            rows.append(_run("kvpress:knorm", r, t, d, k, theirs[r][i]))
            rows.append(_run("kvtier-drop:knorm", r, t, d, k, ours[r][i]))
    return prompts, rows


def test_paired_counts_prompts_only_one_side_answers():
    _, rows = _runs()
    comp = fidelity.paired(rows, ["knorm", "snapkv"], [0.5, 0.9])
    assert set(comp) == {"knorm@0.5", "knorm@0.9"}  # snapkv was not run: no entry, no division by zero
    assert comp["knorm@0.5"] == {"kvtier_drop": 2 / 3, "kvpress": 2 / 3, "only_kvtier": 1, "only_kvpress": 1, "prompts": 3}
    assert comp["knorm@0.9"]["only_kvtier"] == 0 and comp["knorm@0.9"]["only_kvpress"] == 1


def test_render_from_saved_figures():
    prompts, rows = _runs()
    methods = ["kvpress:knorm", "kvtier-drop:knorm"]
    acc, _ = fidelity.summarise(rows, [0.5, 0.9], methods)
    figures = {
        "quick": False,
        "partial": False,
        "recall_budget": 256,
        "recall_selector": "ann",
        "sinks": 4,
        "window": 64,
        "head_profile": {"retrieval": [[1, 0, 1], [0, 0, 1]]},
        "prompts": [{"tokens": t, "depth": d, "key": k} for t, d, k in prompts],
        "accuracy": acc,
        "drop_vs_kvpress": fidelity.paired(rows, ["knorm"], [0.5, 0.9]),
        "runs": rows,
        "perplexity": [
            {"mode": "full", "ratio": 0.0, "scorer": "snapkv", "tokens": 512, "perplexity": 10.0, "max_fast_tokens": 512},
            {"mode": "drop", "ratio": 0.5, "scorer": "snapkv", "tokens": 512, "perplexity": 10.5, "max_fast_tokens": 256},
        ],
    }
    md = fidelity.render(figures)
    assert "3 prompts (2000, 6000 tokens" in md
    assert "duo: 3/6 retrieval heads" in md
    assert "| full | 3/3 | 3/3 |" in md
    assert "| kvtier-drop:knorm | 2/3 | 0/3 |" in md
    assert "| knorm | 1 / 1 | 0 / 1 |" in md
    assert "| drop | 0.5 | 10.500 | +5.00% | 256 |" in md
