"""Schemathesis over the live server's OpenAPI spec: no operation answers a 5xx to anything it generates.

A few examples per operation (positive and negative data, from the published schema itself) keep
this part of the suite short; the fuzz test covers malformed bodies in depth.
"""

from __future__ import annotations

import zlib

import msgpack
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from kvtier.kvstore import chain_hashes
from kvtier.service import wire
from kvtier.service.client import KVTierClient

from .conftest import TINY
from .server import ServiceProcess

MAX_EXAMPLES = 15


@schemathesis.serializer(wire.FRAMES_MEDIA_TYPE)
def _frames(ctx, value):  # the binary body as generated: bytes, or text encoded
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


@schemathesis.serializer(wire.MSGPACK_MEDIA_TYPE)
def _msgpack(ctx, value):  # /v1/retrieve and /v1/attention take the JSON document as msgpack too
    return msgpack.packb(value, use_bin_type=True)


def test_no_server_errors_over_the_openapi_spec():
    srv = ServiceProcess()
    try:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        with KVTierClient(srv.url) as c:  # a registered model with a cached block, so calls get past "unknown model"
            model = c.register_spec(TINY)
            key = chain_hashes(TINY, list(range(16)))[0]
            c.put(model, [key], torch.zeros(1, *TINY.block_shape, dtype=torch.float16))
        labels, statuses = [], {}
        for result in schema.get_all_operations():
            op = result.ok()
            labels.append(op.label)

            @given(case=op.as_strategy())
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                # half the cases name the real model (and, in key lists, the cached block)
                if zlib.crc32(repr((case.body, case.query)).encode()) % 2 == 0:
                    if isinstance(case.body, dict) and "model" in case.body:
                        case.body["model"] = model
                        for field in ("keys", "hashes"):
                            if isinstance(case.body.get(field), list) and case.body[field]:
                                case.body[field][0] = key.hex()
                    if isinstance(case.query, dict) and "model" in case.query:
                        case.query["model"] = model
                response = case.call(timeout=30)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error])

            check()
        assert len(labels) >= 14 and "POST /v1/retrieve" in labels and "POST /v1/attention" in labels, labels
        assert sum(statuses.values()) >= 5 * len(labels) and not any(s >= 500 for s in statuses), statuses
        print(f"schemathesis: {len(labels)} operations, statuses {dict(sorted(statuses.items()))}")
        assert srv.alive()
    finally:
        srv.stop()
