"""The fast lookup path (``FastLookup``) and the pydantic route read a body the same way.

``_well_formed_lookup`` answers ``POST /v1/lookup`` without FastAPI when a body is exactly what
``LookupIn`` accepts; anything else falls through to the pydantic route. So wherever the fast path
accepts a body, the model must accept it too with the same values: then the two paths can never
give different answers. Fed with the fuzz corpus's lookup bodies, hand-made edge cases (the limits
of service/limits.py, lone surrogates, deep nesting) and generated JSON.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvtier.service.limits import MAX_EXTRA_KEYS, MAX_MODEL_CHARS, MAX_NAMESPACE_CHARS, MAX_TOKEN_ID
from kvtier.service.rest_middleware import _well_formed_lookup
from kvtier.service.rest_models import LookupIn
from tests.service.test_fuzz import malformed_requests

H = "ab" * 32


def _same_reading(body: bytes) -> None:
    fast = _well_formed_lookup(body)
    if fast is None:
        return  # falls through to the pydantic route: one reading by construction
    try:
        model = LookupIn.model_validate_json(body)
    except ValidationError as e:
        pytest.fail(f"the fast path accepted a body the model refuses: {body[:200]!r}: {e}")
    got = model.model_dump(exclude_unset=True)
    assert got == {k: v for k, v in fast.items()}, body[:200]


EDGES = [
    {"model": "m", "token_ids": [1, 2, 3]},
    {"model": "m" * MAX_MODEL_CHARS, "token_ids": [MAX_TOKEN_ID]},
    {"model": "m" * (MAX_MODEL_CHARS + 1), "token_ids": [1]},
    {"model": "m", "token_ids": [MAX_TOKEN_ID + 1]},
    {"model": "m", "token_ids": [-1]},
    {"model": "m", "token_ids": [True]},
    {"model": "m", "token_ids": [1.0]},
    {"model": "m", "token_ids": ["1"]},
    {"model": "m", "hashes": [H]},
    {"model": "m", "hashes": [H[:-1]]},
    {"model": "m", "hashes": [H], "token_ids": [1]},
    {"model": "m"},
    {"model": 3, "token_ids": [1]},
    {"model": "m", "token_ids": [1], "salt": "s" * MAX_NAMESPACE_CHARS},
    {"model": "m", "token_ids": [1], "salt": "s" * (MAX_NAMESPACE_CHARS + 1)},
    {"model": "m", "token_ids": [1], "extra_keys": ["k"] * MAX_EXTRA_KEYS},
    {"model": "m", "token_ids": [1], "extra_keys": ["k"] * (MAX_EXTRA_KEYS + 1)},
    {"model": "m", "token_ids": [1], "extra_keys": [1]},
    {"model": "m", "token_ids": [1], "return_keys": True},
    {"model": "m", "token_ids": [1], "return_keys": 1},
    {"model": "m", "token_ids": [1], "surplus": 1},
    [1, 2],
    "m",
]
RAW = [
    b'{"model": "m", "token_ids": [1], "salt": "\\ud800"}',
    b'{"model": "m", "token_ids": [1], "extra_keys": ["\\udfff"]}',
    b"[" * 5000 + b"]" * 5000,
    b"",
    b"\xff\xfe",
    b'{"model": "m", "token_ids": [1]',
    b'{"model": "m", "token_ids": [1e3]}',
]


@pytest.mark.parametrize("body", [json.dumps(e).encode() for e in EDGES] + RAW)
def test_edge_cases_read_the_same(body):
    _same_reading(body)


def test_the_fuzz_corpus_reads_the_same():
    bodies = []
    for _method, path, kwargs in malformed_requests("m" * 16, random.Random(5)):
        if path == "/v1/lookup" and isinstance(kwargs.get("content"), bytes):
            bodies.append(kwargs["content"])
        elif path == "/v1/lookup" and "json" in kwargs:
            bodies.append(json.dumps(kwargs["json"]).encode())
    assert bodies
    for body in bodies:
        _same_reading(body)


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, MAX_TOKEN_ID + 2), st.floats(allow_nan=False), st.text(max_size=8))
_value = st.recursive(
    _scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=12
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"model": st.one_of(st.text(max_size=70), _scalar)},
        optional={
            "token_ids": st.one_of(st.lists(st.integers(-1, MAX_TOKEN_ID + 1), max_size=5), _value),
            "hashes": st.one_of(st.lists(st.sampled_from([H, H[:10], "zz" * 32]), max_size=3), _value),
            "salt": st.one_of(st.text(max_size=300), _value),
            "extra_keys": st.one_of(st.lists(st.text(max_size=4), max_size=18), _value),
            "return_keys": _value,
            "other": _value,
        },
    )
)
def test_generated_bodies_read_the_same(req):
    _same_reading(json.dumps(req).encode())
