"""ECG decode benchmark: what the worker-process pool costs a normal call, and what it saves under attack.

Run: ``.venv/bin/python benchmarks/ecg_decode.py [--quick] [--rounds N] [--processes N]``.

The job is the one a hook call decodes for a DICOM attachment: the bundled 10 s, 500 Hz, 12-lead
teaching ECG (``tests/data/ecg/guangxi_teaching_sinus_rhythm.dcm``, 143 KB) read with the
service's limits and lead aliases, through :func:`cds_service.ecg.isolation.decode` (file →
reader → the 12 model leads). Prints one ``name: value`` line per figure:

* ``ecg_decode_inprocess_ms_p50``: the decode in the calling process;
* ``ecg_decode_pool_ms_p50``: the same job through a warm :class:`Decoder` (``--processes``
  workers, default 2: the service default): pickling the job, the pipe both ways and unpickling
  the recording on top of the decode;
* ``ecg_decode_pool_overhead_ms``: the difference of the two medians;
* ``ecg_decode_inline_max_ms_p50``: a ``valueSampledData`` job of ``INLINE_CHARS`` characters of
  sample text (the largest the decoder runs in the caller), in-process;
* ``ecg_decode_pool_stalled_ms_p95``: p95 of normal decodes from two threads at once while one
  hostile job burns CPU in a worker until its deadline (one worker left for the normal ones);
* ``ecg_decode_inprocess_stalled_ms_p95``: the same normal decodes in-process while the hostile
  job burns CPU in a thread of this process (what the pool avoids: the GIL is shared);
* ``ecg_decode_hostile_abandoned_ms``: how long after its start the hostile decode was answered
  ``decode_timeout`` (its deadline is 2 s), and ``ecg_decode_workers_replaced``.

Rounds are interleaved with a short sleep (``_common.timed_rounds``). ``--quick`` runs a handful.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import percentiles_ms, report, timed_rounds

from cds_service.ecg.isolation import INLINE_CHARS, DecodeJob, Decoder, decode
from cds_service.ecg.readers.sampled_data import lead_components
from cds_service.ecg.record import EcgRecording, EcgRejected
from cds_service.ecg.select import lead_aliases, read_limits
from fhir_mappings import load_mappings
from fhir_mappings.signal_spec import MODEL_LEADS

REPO = Path(__file__).resolve().parents[1]
DICOM = REPO / "tests" / "data" / "ecg" / "guangxi_teaching_sinus_rhythm.dcm"
HOSTILE = "benchmark-hostile"
HOSTILE_DEADLINE_S = 2.0


def work(job: DecodeJob) -> EcgRecording:
    """The workers' function: :func:`decode`, except that the hostile job burns CPU until killed."""
    if job.hint == HOSTILE:
        _burn(float("inf"))
    return decode(job)


def _burn(seconds: float) -> None:
    """Pure-Python CPU work (it holds the GIL between switches) for ``seconds``."""
    end = time.monotonic() + seconds
    counter = 0
    while time.monotonic() < end:
        counter += 1


def _jobs() -> tuple[DecodeJob, DecodeJob, DecodeJob]:
    """The normal DICOM job, its hostile twin, and the largest valueSampledData job decoded inline."""
    ecg = load_mappings().ecg
    limits, aliases = read_limits(ecg), lead_aliases(ecg)
    data = DICOM.read_bytes()
    normal = DecodeJob(limits, aliases, float(ecg.min_duration_s), data=data)
    hostile = DecodeJob(limits, aliases, float(ecg.min_duration_s), data=data, hint=HOSTILE)
    per_lead = INLINE_CHARS // len(MODEL_LEADS)
    text = " ".join(str((k * 37) % 900 - 450) for k in range(per_lead))[:per_lead].rsplit(" ", 1)[0]
    n = len(text.split())
    components = [
        {
            "code": {"text": lead},
            "valueSampledData": {"origin": {"value": 0, "code": "uV"}, "period": 2500 / n, "data": text},
        }
        for lead in MODEL_LEADS
    ]
    leads = tuple(lead_components(components, lambda code: str(code["text"])))
    sampled = DecodeJob(limits, aliases, float(ecg.min_duration_s), leads=leads)
    return normal, hostile, sampled


def _concurrent(decode_one: Callable[[], object], rounds: int) -> list[float]:
    """Wall times of ``rounds`` calls of ``decode_one`` from two threads at once."""
    times: list[float] = []
    lock = threading.Lock()

    def timed() -> None:
        started = time.perf_counter()
        decode_one()
        with lock:
            times.append(time.perf_counter() - started)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as threads:
        for future in [threads.submit(timed) for _ in range(rounds)]:
            future.result()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a handful of rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds per figure (default 60)")
    parser.add_argument("--processes", type=int, default=2, help="decoder worker processes (default 2)")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    normal, hostile, sampled = _jobs()
    decode(normal)  # imports and first-call costs are not a round's
    with Decoder(args.processes, work=work) as decoder:
        decoder.warm_up()
        decoder.decode(normal)
        timings = timed_rounds(
            {
                "inprocess": lambda: decode(normal),
                "pool": lambda: decoder.decode(normal),
                "inline": lambda: decode(sampled),
            },
            rounds,
        )
        inprocess, _ = percentiles_ms(timings["inprocess"])
        pool, _ = percentiles_ms(timings["pool"])
        inline, _ = percentiles_ms(timings["inline"])
        report("ecg_decode_inprocess_ms_p50", inprocess)
        report("ecg_decode_pool_ms_p50", pool)
        report("ecg_decode_pool_overhead_ms", pool - inprocess)
        report("ecg_decode_inline_max_ms_p50", inline)

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as attacker:
            started = time.monotonic()
            attack = attacker.submit(decoder.decode, hostile, started + HOSTILE_DEADLINE_S)
            time.sleep(0.1)
            stalled = _concurrent(lambda: decoder.decode(normal, time.monotonic() + 10.0), rounds)
            try:
                attack.result()
                raise SystemExit("the hostile decode was not abandoned")
            except EcgRejected as exc:
                if exc.reason != "decode_timeout":
                    raise
            abandoned_ms = 1000 * (time.monotonic() - started)
        report("ecg_decode_pool_stalled_ms_p95", percentiles_ms(stalled)[1])

        burner = threading.Thread(target=_burn, args=(HOSTILE_DEADLINE_S * 5,), daemon=True)
        burner.start()
        inline_stalled = _concurrent(lambda: decode(normal), rounds)
        report("ecg_decode_inprocess_stalled_ms_p95", percentiles_ms(inline_stalled)[1])
        report("ecg_decode_hostile_abandoned_ms", abandoned_ms)
        report("ecg_decode_workers_replaced", decoder.replaced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
