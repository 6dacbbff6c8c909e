"""Schemathesis against a live `tachymail serve`: every operation of the served OpenAPI
document, with generated (valid and invalid) input, must answer no 5xx, only documented
status codes, and bodies that match the documented schemas (issue 13).

The server is this module's own (held queue, its own data directory): whatever the
generated requests queue, hold or delete is in that queue only. The token has scope all.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, run_cli, running_server  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
#: examples per operation: enough to reach every documented status, few enough for < 60 s
EXAMPLES = 12


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("openapi")
    data = tmp / "data"
    extra = "[auth]\nfailure_delay = 0.01\nmax_failure_delay = 0.02\n"
    with running_server(tmp, extra, roles=("mx", "http"), data_dir=data) as server:
        server.extra["token"] = run_cli("token", "add", "fuzz", "--scope", "all", data_dir=data)
        yield server
        assert "Traceback" not in server.log()


def test_every_operation_conforms(live: Server) -> None:
    url = f"http://127.0.0.1:{live.ports['http']}/api/v1/openapi.json"
    schema = schemathesis.openapi.from_url(url)
    headers = {"Authorization": f"Bearer {live.extra['token'].strip()}"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/queue", "/api/v1/queue/{id}"}
    for operation in operations:
        for mode in GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            def run(case: Any) -> None:
                case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

            try:
                run()
            except Exception as exc:  # every operation is tried; all failures are reported
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
