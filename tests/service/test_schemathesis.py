"""Schemathesis over the live server's OpenAPI spec: no operation answers a 5xx to anything it generates.

A few examples per operation (positive and negative data, from the published schema itself) keep
this part of the suite short; the fuzz test covers malformed bodies in depth.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service import wire

from .server import ServiceProcess

MAX_EXAMPLES = 15


@schemathesis.serializer(wire.FRAMES_MEDIA_TYPE)
def _frames(ctx, value):  # the binary body as generated: bytes, or text encoded
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


def test_no_server_errors_over_the_openapi_spec():
    srv = ServiceProcess()
    try:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        labels, statuses = [], {}
        for result in schema.get_all_operations():
            op = result.ok()
            labels.append(op.label)

            @given(case=op.as_strategy())
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call(timeout=30)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error])

            check()
        assert len(labels) >= 12, labels
        assert sum(statuses.values()) >= 5 * len(labels) and not any(s >= 500 for s in statuses), statuses
        print(f"schemathesis: {len(labels)} operations, statuses {dict(sorted(statuses.items()))}")
        assert srv.alive()
    finally:
        srv.stop()
