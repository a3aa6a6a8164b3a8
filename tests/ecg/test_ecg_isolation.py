"""ECG decoding in worker processes (:mod:`cds_service.ecg.isolation`): abandoned at the deadline.

The workers run :func:`tests.ecg_workers.work`, which decodes normally unless the job's ``hint``
asks it to misbehave (``stall``, ``crash``, ``raise``, ``where``). Timings are measured and recorded (``tests.figures``), not asserted tightly: the machine is
shared.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cds_service.ecg.isolation import DecodeJob, Decoder, decode
from cds_service.ecg.readers.sampled_data import lead_components
from cds_service.ecg.record import EcgRejected, ReadLimits
from cds_service.ecg.select import lead_aliases, read_limits, select_ecg
from fhir_mappings import load_mappings
from fhir_mappings.signal_spec import MODEL_LEADS
from tests.ecg_workers import work
from tests.figures import record_figure

DCM = Path(__file__).parents[1] / "data" / "ecg" / "guangxi_teaching_sinus_rhythm.dcm"
DEADLINE_SLACK_S = 1.0  # how late past its deadline an abandoned decode may return (loaded CI machine)


@pytest.fixture(scope="module")
def ecg() -> Any:
    return load_mappings().ecg


def _file_job(ecg: Any, hint: str | None = None) -> DecodeJob:
    return DecodeJob(read_limits(ecg), lead_aliases(ecg), 2.5, data=DCM.read_bytes(), hint=hint)


def _sampled_job(ecg: Any, seconds: float = 3.0, hint: str | None = None) -> DecodeJob:
    n = int(seconds * 100)
    components = [
        {
            "code": {"text": lead},
            "valueSampledData": {
                "origin": {"value": 0, "code": "uV"},
                "period": 10,
                "dimensions": 1,
                "data": " ".join(str((i * 7 + k) % 400 - 200) for k in range(n)),
            },
        }
        for i, lead in enumerate(MODEL_LEADS)
    ]
    aliases = lead_aliases(ecg)
    leads = tuple(lead_components(components, lambda code: str(code["text"])))
    return DecodeJob(read_limits(ecg), aliases, 2.5, leads=leads, hint=hint)


@pytest.fixture
def decoder() -> Iterator[Decoder]:
    with Decoder(2, work=work) as pool:
        pool.warm_up()
        yield pool


def test_pool_decodes_exactly_what_the_process_decodes(decoder: Decoder, ecg: Any) -> None:
    """A worker's recording is the in-process one, bit for bit (the pool changes where, not what)."""
    job = _file_job(ecg)
    here = decode(job)
    there = decoder.decode(job, time.monotonic() + 10)
    assert there.lead_names == here.lead_names == MODEL_LEADS and there.fs == here.fs
    np.testing.assert_array_equal(there.signal, here.signal)


def test_files_go_to_a_worker_and_small_sampled_data_stays_inline(decoder: Decoder, ecg: Any) -> None:
    """Files always run in a worker; valueSampledData under ``inline_chars`` runs in the caller."""
    with pytest.raises(EcgRejected) as far:
        decoder.decode(_file_job(ecg, "where"), time.monotonic() + 10)
    assert str(os.getpid()) not in str(far.value)
    small = _sampled_job(ecg, hint="where")
    assert small.inline_size is not None and small.inline_size <= decoder.inline_chars
    with pytest.raises(EcgRejected) as near:
        decoder.decode(small, time.monotonic() + 10)
    assert f"process {os.getpid()}" in str(near.value)


def test_a_stuck_decode_is_abandoned_at_the_deadline_and_its_worker_replaced(
    decoder: Decoder, ecg: Any
) -> None:
    """decode_timeout at the deadline; the stuck process is killed and a fresh one serves the next ECG."""
    budget = 0.5
    started = time.monotonic()
    with pytest.raises(EcgRejected) as info:
        decoder.decode(_file_job(ecg, "stall"), started + budget)
    elapsed = time.monotonic() - started
    record_figure("ECG decode abandoned at a 500 ms deadline after", f"{1000 * elapsed:.0f} ms")
    assert info.value.reason == "decode_timeout"
    assert budget <= elapsed < budget + DEADLINE_SLACK_S
    assert decoder.replaced == 1
    for _ in range(3):  # both workers, the replacement among them, decode normally
        assert decoder.decode(_file_job(ecg), time.monotonic() + 10).lead_names == MODEL_LEADS


def test_concurrent_decodes_proceed_while_one_worker_is_stuck(decoder: Decoder, ecg: Any) -> None:
    """One hostile file holds one worker; normal decodes for other patients keep being served."""
    job = _file_job(ecg)
    baseline = []
    for _ in range(10):
        t0 = time.perf_counter()
        decoder.decode(job, time.monotonic() + 10)
        baseline.append(time.perf_counter() - t0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as threads:
        hostile = threads.submit(decoder.decode, _file_job(ecg, "stall"), time.monotonic() + 4.0)
        time.sleep(0.2)  # the stall holds a worker now
        during = []
        for _ in range(10):
            t0 = time.perf_counter()
            decoder.decode(job, time.monotonic() + 3.0)
            during.append(time.perf_counter() - t0)
        with pytest.raises(EcgRejected) as info:
            hostile.result()
    assert info.value.reason == "decode_timeout"
    p95 = float(np.percentile(during, 95))
    record_figure(
        "ECG decode p50 alone / p95 with one stuck worker",
        f"{1000 * statistics.median(baseline):.0f} ms / {1000 * p95:.0f} ms",
    )


def test_a_crashing_worker_makes_that_ecg_unreadable_and_is_replaced(decoder: Decoder, ecg: Any) -> None:
    """A worker that dies mid-decode (crash, OOM kill) → unreadable for that ECG; the pool recovers."""
    with pytest.raises(EcgRejected) as info:
        decoder.decode(_file_job(ecg, "crash"), time.monotonic() + 10)
    assert info.value.reason == "unreadable"
    assert decoder.replaced == 1
    assert decoder.decode(_file_job(ecg), time.monotonic() + 10).lead_names == MODEL_LEADS


def test_reasons_cross_the_process_boundary_and_bugs_are_unreadable(decoder: Decoder, ecg: Any) -> None:
    """A reader's reason comes back as raised; an unexpected exception in a worker is unreadable."""
    limits = ReadLimits(max_bytes=1000)
    too_big = DecodeJob(limits, lead_aliases(ecg), 2.5, data=DCM.read_bytes())
    with pytest.raises(EcgRejected) as info:
        decoder.decode(too_big, time.monotonic() + 10)
    assert info.value.reason == "attachment_too_large"
    with pytest.raises(EcgRejected) as info:
        decoder.decode(_file_job(ecg, "raise"), time.monotonic() + 10)
    assert info.value.reason == "unreadable" and "ZeroDivisionError" in str(info.value)
    assert decoder.replaced == 0


def test_no_free_worker_before_the_deadline_is_a_timeout(ecg: Any) -> None:
    """With every worker busy, a decode waits only until its deadline, and a spent budget waits not at all."""
    with Decoder(1, work=work) as pool, concurrent.futures.ThreadPoolExecutor(max_workers=1) as threads:
        pool.warm_up()
        hostile = threads.submit(pool.decode, _file_job(ecg, "stall"), time.monotonic() + 2.0)
        time.sleep(0.2)
        with pytest.raises(EcgRejected) as info:
            pool.decode(_file_job(ecg), time.monotonic() + 0.3)
        assert info.value.reason == "decode_timeout"
        with pytest.raises(EcgRejected) as info:
            pool.decode(_file_job(ecg), time.monotonic() - 1)
        assert info.value.reason == "decode_timeout"
        with pytest.raises(EcgRejected):
            hostile.result()
    assert pool.replaced == 1


def test_in_process_decoder_and_closing(ecg: Any) -> None:
    """processes=0 decodes in the caller; a closed decoder refuses work and leaves no process behind."""
    with Decoder(0, work=work) as inline, pytest.raises(EcgRejected) as info:
        inline.decode(_file_job(ecg, "where"))
    assert f"process {os.getpid()}" in str(info.value)
    pool = Decoder(1, work=work)
    pool.warm_up()
    assert pool.decode(_file_job(ecg), time.monotonic() + 10).fs == 500.0
    pool.close()
    with pytest.raises(RuntimeError):
        pool.decode(_file_job(ecg))


def test_select_ecg_through_the_pool_rejects_a_stuck_newest_ecg_without_failing(
    decoder: Decoder, ecg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """select_ecg with a decoder: a decode past the deadline is a rejected ECG (decode_timeout), not an error."""
    from cds_service.ecg import select
    from model_training.seed_fhir import Carrier, ecg_resources

    now = datetime(2025, 6, 1, 12, tzinfo=UTC)
    teaching = (DCM.with_suffix(".xml").read_bytes(), DCM.read_bytes())
    media = ecg_resources(
        Carrier("media", "dicom", teaching=True),
        None,
        teaching,
        "p1",
        now - timedelta(minutes=5),
        load_mappings(),
    )
    real_job = select._job

    def stalling_job(*args: Any) -> DecodeJob:
        job = real_job(*args)
        return DecodeJob(job.limits, job.aliases, job.min_duration_s, data=job.data, hint="stall")

    monkeypatch.setattr(select, "_job", stalling_job)
    started = time.monotonic()
    with pytest.raises(EcgRejected) as info:
        select_ecg(media, ecg, now=now, patient_id="p1", decoder=decoder, deadline=started + 0.5)
    assert info.value.reason == "decode_timeout"
    assert time.monotonic() - started < 0.5 + DEADLINE_SLACK_S


def test_workers_that_cannot_start_fall_back_to_decoding_in_process(
    ecg: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No worker process can start (e.g. the app built at import time of an unguarded __main__ under
    forkserver): each ECG is still decoded, in the caller, and the cause is logged once as an error."""
    import logging

    from cds_service.ecg import isolation

    def refuse(self: Any) -> None:
        raise RuntimeError("An attempt has been made to start a new process before bootstrapping")

    monkeypatch.setattr(isolation._Worker, "start", refuse)
    with caplog.at_level(logging.ERROR, logger="cds_service"), Decoder(1, work=work) as pool:
        pool.warm_up()
        first = pool.decode(_file_job(ecg), time.monotonic() + 5)
        second = pool.decode(_file_job(ecg), time.monotonic() + 5)
    assert np.array_equal(first.signal, decode(_file_job(ecg)).signal) and np.array_equal(
        second.signal, first.signal
    )
    assert pool.start_failures == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot start" in errors[0].getMessage()


def test_decodes_during_a_background_warm_up_run_in_the_caller(
    ecg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first calls after start-up do not wait for the workers (the forkserver's imports take
    seconds): they decode in the caller; once warm, decodes go to a worker process."""
    from cds_service.ecg import isolation

    real_start = isolation._Worker.start

    def slow_start(self: Any) -> None:
        time.sleep(1.0)
        real_start(self)

    monkeypatch.setattr(isolation._Worker, "start", slow_start)
    with Decoder(1, work=work) as pool:
        pool.warm_up(background=True)
        with pytest.raises(EcgRejected, match=f"process {os.getpid()}$"):
            pool.decode(_file_job(ecg, "where"), time.monotonic() + 0.5)
        deadline = time.monotonic() + 30
        while pool._warming.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(EcgRejected) as info:
            pool.decode(_file_job(ecg, "where"), time.monotonic() + 10)
        assert not str(info.value).endswith(f"process {os.getpid()}")
