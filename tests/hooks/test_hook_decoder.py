"""Hook calls decode their ECG in the service's worker processes, abandoned at the call's budget.

``ECGLAB_ECG_DECODE_PROCESSES`` (default 2) gives each app a
:class:`~cds_service.ecg.isolation.Decoder`; the pipeline hands it the call's deadline
(:func:`cds_service.fetch.model_inputs`). A decode stuck in CPU work (a hostile file no bound
caught) then costs that call its card, not its answer, and not the next patient's call. The
workers here run :func:`tests.ecg_workers.work`; the ``select._job`` hook asks them to misbehave.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cds_service.ecg import select
from cds_service.ecg.isolation import DecodeJob, Decoder
from cds_service.ecg.record import EcgRejected
from tests.ecg_workers import work
from tests.service_fixtures import (
    AppFactory,
    clinical_record,
    hook_request,
    positive_runtime,
    prefetch_from,
)

HOOK = "/cds-services/ecglab-patient-view"
BUDGET_MS = 1500
SLACK_S = 1.0
"""Scheduling slack on a shared 2-core machine; a decode that was not abandoned never returns."""


def _post(client: Any) -> tuple[Any, float]:
    """One patient-view call with a recent ECG (12 leads of sampled data) prefetched."""
    body = hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
    started = time.monotonic()
    response = client.post(HOOK, json=body)
    return response, time.monotonic() - started


@pytest.fixture
def hinted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str | None]]:
    """Set ``hint[0]`` to make the workers misbehave on the next decode (``None``: decode normally)."""
    hint: list[str | None] = [None]
    real_job = select._job

    def job_with_hint(*args: Any) -> DecodeJob:
        job = real_job(*args)
        return DecodeJob(
            job.limits, job.aliases, job.min_duration_s, data=job.data, leads=job.leads, hint=hint[0]
        )

    monkeypatch.setattr(select, "_job", job_with_hint)
    yield hint


@pytest.fixture
def client(make_app: AppFactory) -> Iterator[Any]:
    """An app (auth off) whose decoder runs :func:`tests.ecg_workers.work` in one worker process."""
    app = make_app(
        runtime=positive_runtime(), auth=False, issuers="", budget_ms=BUDGET_MS, ecg_decode_processes=1
    )
    deps = app.extensions["ecglab"].pipeline.deps
    assert isinstance(deps.decoder, Decoder) and deps.decoder.processes == 1
    deps.decoder.close()
    deps.decoder = Decoder(1, work=work)
    deps.decoder.warm_up()
    yield app.test_client()


def test_the_default_service_decodes_in_worker_processes(make_app: AppFactory) -> None:
    """ECGLAB_ECG_DECODE_PROCESSES defaults to 2 worker processes; 0 decodes in the request thread."""
    from cds_service.settings import Settings

    assert Settings().ecg_decode_processes == 2
    assert make_app(ecg_decode_processes=0).extensions["ecglab"].pipeline.deps.decoder is None


def test_a_hook_calls_ecg_is_decoded_in_a_worker_process(
    client: Any, hinted: list[str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's ECG goes to a worker with the call's deadline; a healthy decode there gives the card."""
    decoder = client.application.extensions["ecglab"].pipeline.deps.decoder
    seen: list[tuple[float | None, str]] = []
    real_decode = decoder.decode

    def spy(job: DecodeJob, deadline: float | None = None) -> Any:
        try:
            return real_decode(job, deadline)
        except EcgRejected as exc:
            seen.append((deadline, str(exc)))
            raise

    monkeypatch.setattr(decoder, "decode", spy)
    hinted[0] = "where"
    started = time.monotonic()
    response, _ = _post(client)
    ended = time.monotonic()
    assert response.status_code == 200 and response.get_json() == {"cards": []}
    [(deadline, message)] = seen
    assert deadline is not None and started + BUDGET_MS / 2000 < deadline <= ended + BUDGET_MS / 1000
    worker_pid = int(message.rsplit(" ", 1)[-1])
    assert worker_pid != os.getpid()
    hinted[0] = None
    response, _ = _post(client)
    assert response.status_code == 200 and response.get_json()["cards"], "a healthy decode gives the card"


def test_a_stuck_decode_costs_the_call_its_card_not_its_answer(client: Any, hinted: list[str | None]) -> None:
    """A decode that never ends is abandoned at the budget: 200 without cards, in time; the next call gets its card."""
    hinted[0] = "stall"
    response, elapsed = _post(client)
    assert response.status_code == 200 and response.get_json() == {"cards": []}
    assert elapsed <= BUDGET_MS / 1000 + SLACK_S, f"answered after {elapsed:.2f} s"
    hinted[0] = None
    response, elapsed = _post(client)
    assert response.status_code == 200 and response.get_json()["cards"]
    assert elapsed <= BUDGET_MS / 1000 + SLACK_S
