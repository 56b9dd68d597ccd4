"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis).

A real uvicorn server (SQLite, real Redis) is fuzzed with a valid token: every operation gets
generated valid and invalid parameters and bodies. The run asserts that no response is a server
error and that every response (status code, content type, body) is one the OpenAPI document
declares. Bounded in time: a few dozen examples per operation, no Hypothesis database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis.errors import Unsatisfiable
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service import crud
from service.core.config import Settings
from service.main import create_app
from tests.redis_server import RedisServer
from tests.service.helpers import KiB
from tests.service.live import serve

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 60  # per operation and mode: ~1 500 requests, about 30 s on two cores


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_server: RedisServer) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    roots = tmp / "roots"
    roots.mkdir()
    settings = Settings(
        env="local", data_dir=tmp / "data", database_url=f"sqlite:///{tmp / 'gid.db'}", redis_url=redis_server.url,
        data_roots=[roots], max_upload_bytes=256 * KiB, max_annotation_bytes=64 * KiB,
        max_json_body_bytes=64 * KiB, max_devices=2,
    )
    app = create_app(settings)
    with serve(app) as base_url:
        with app.state.session_factory() as session:
            owner = crud.get_or_create_owner(session, name="fuzzer")
            token = crud.create_token(session, owner_id=owner.id, secret=settings.secret_key)
        yield base_url, token


def fuzz_operation(operation, mode: GenerationMode, token: str, calls: Counter) -> None:
    """Hypothesis run over one operation's generated requests; raises on the first failing check
    (after shrinking it to a minimal request)."""

    @hypothesis_settings(
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        calls[operation.label] += 1
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=30)

    run()


@pytest.mark.slow  # a minute of generated requests: scheduled early under xdist (tests/conftest.py)
def test_no_server_error_and_every_response_documented(live):
    base_url, token = live
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    failures, calls = [], Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, token, calls)
            except Unsatisfiable:  # no parameters and no body: nothing invalid to generate
                assert mode is GenerationMode.NEGATIVE
            except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report
                failures.append(f"{operation.label} ({mode.value}): {e}")
    assert not failures, "\n\n".join(failures)
    assert all(calls[op.label] for op in operations), calls  # every operation was really exercised
