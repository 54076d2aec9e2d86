"""The OpenAPI document is the truth: Schemathesis generates requests for every operation of
/openapi.json (valid ones and ones that break the schema) against the running stack and runs all of
its checks on each answer: no server error, every status documented, every body matching its schema
(errors included: {"detail": "..."}), content types as declared.

The requests use a tenant of their own, so whatever they create or delete touches no other test.
"""

from __future__ import annotations

import math
import os

import pytest

# Every check Schemathesis has, but two that judge meaning rather than conformance:
# - positive_data_acceptance expects any schema-valid body to succeed, but schema-valid bytes are
#   rarely a readable archive (an upload of random bytes rightly answers 422);
# - negative_data_rejection expects every schema violation to be refused, but it counts an unknown
#   query parameter (ignored, as HTTP APIs do) and a dropped Authorization header that this test
#   adds back to every request as "accepted".
EXCLUDED_NAMES = ("positive_data_acceptance", "negative_data_rejection")
# uvicorn's HTTP parser answers a request that is not valid HTTP, or whose request line is longer
# than it reads (about 64 KB: a negative case can repeat a query parameter thousands of times), with
# this plain-text 400 before the API sees it: a bound on the request, not an answer of the API.
UVICORN_REJECTION = "Invalid HTTP request received."
CASES = 1_000  # the floor the issue asks for (about 50 generated requests per operation)


def test_every_operation_conforms_to_the_schema(api_server: str, cpu_worker, stack) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.specs.openapi import checks as openapi_checks

    from app.services.auth import create_key
    from tests.stack import db_session

    global EXCLUDED
    EXCLUDED = [getattr(openapi_checks, name) for name in EXCLUDED_NAMES]
    with db_session() as session:
        key = create_key(session, "tenant-fuzz")
        session.commit()
    headers = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(f"{api_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    only = os.environ.get("SCAN_FUZZ_ONLY")  # "POST /v1/runs,GET /livez": reproduce a few operations
    if only:
        operations = [op for op in operations if op.label in only.split(",")]
    assert len(operations) >= 20 or only
    # Some operations have fewer distinct inputs than asked for (GET /livez has one): ask for more.
    per_mode = math.ceil(1.5 * CASES / len(operations) / 2) + 2
    calls: list[str] = []
    failures: list[str] = []
    rejected: list[str] = []

    def fuzz_one(operation, mode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=per_mode,
            deadline=None,
            phases=[Phase.generate],
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case) -> None:
            calls.append(operation.label)
            try:
                response = case.call(base_url=api_server, headers=headers, timeout=120)
                if response.status_code == 400 and response.text == UVICORN_REJECTION:
                    rejected.append(operation.label)  # never reached the API: see UVICORN_REJECTION
                    return
                transport = {"base_url": api_server, "headers": dict(headers), "timeout": 120}
                case.validate_response(response, headers=headers, excluded_checks=EXCLUDED, transport_kwargs=transport)
            except BaseException as exc:  # a FailureGroup is a BaseExceptionGroup: collect them all
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                text = str(exc) + "".join(f"\n{e}" for e in getattr(exc, "exceptions", ()))
                kinds = sorted(
                    {
                        ln.strip()[:120]
                        for ln in text.splitlines()
                        if ln.strip().startswith(("- ", "[1", "[2", "[3", "[4", "[5"))
                    }
                )
                failures.append(f"{operation.label} ({mode}): {'; '.join(kinds) or text[:300]}")

        try:
            fuzz()
        except Unsatisfiable:  # no way to break this operation's schema (e.g. GET /livez)
            assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz_one(operation, mode)
    distinct = sorted(set(failures))
    assert not failures, f"{len(failures)} of {len(calls)} cases failed:\n" + "\n".join(distinct[:40])
    assert len(calls) >= CASES or only, len(calls)
    # The HTTP server's own refusals are rare (a generated query past its 64 KB request line), not
    # a way for the API to dodge its checks.
    assert len(rejected) <= max(1, len(calls) // 100), sorted(set(rejected))
