"""CDS Hooks benchmark: hook latency with prefetch, with FHIR fetching and from a stored prediction.

Run: ``.venv/bin/python benchmarks/hooks.py [--model DIR] [--quick] [--calls N] [--patients N]``.

Setup: a throw-away sekmet FHIR R4 server (``.venv-fhir/bin/sekmet``, in-memory, on a free
loopback port) is seeded with ``--patients`` demo patients by the code behind ``ecglab seed-fhir``
(``cds_service.seed`` on a small generated MIMIC-layout set), the service app is built in process
(``create_app``, auth off, ``ECGLAB_DEV_FHIR_SERVERS`` = that server, SQLite in a temporary
folder, the budget raised to 60 s so a slow call is measured rather than cut off, the prediction
cache off so that every call runs the model; a second app with the cache on for the ``cache hit``
call) around the real
``ModelRuntime`` on the CPU provider. The model is ``--model``, else the bundled one, else a random
paper-size export (``--quick``: a tiny one); the ``model`` line says which. Only patients whose ECG
travels inside its resource are used (a ``Binary`` would need a FHIR read in the prefetch case).

Each round calls, for the next patient in turn, after a short sleep each (``_common.timed_rounds``):

* ``prefetch``: ``POST /cds-services/ecglab-patient-view`` through Flask's test client with every
  prefetch key filled, as an EHR would send it (read from the server with the service's own
  prefetch templates), and no ``fhirServer``: parse, decode the ECG, extract features, infer,
  build cards, record them;
* ``fhir fetch``: the same hook with ``fhirServer`` + ``fhirAuthorization`` and no prefetch, so
  the service queries sekmet (in parallel) before doing the same work;
* ``bare``: ``runtime.predict`` on that patient's extracted inputs;
* ``cache hit``: ``order-select`` with every prefetch key filled, on the app with the prediction
  cache on, after that app answered ``patient-view`` for the same patient and prefetch (once per
  patient, before the timing): the prediction is reused, no ECG decoding, no inference.

Every hook call must answer 200 and run the model exactly once (the cache hits: never), else the
benchmark stops. Prints ``hook_prefetch_ms_p50``/``_p95``, ``hook_fhir_fetch_ms_p50``/``_p95``,
``bare_inference_ms_p50``/``_p95`` and ``hook_calls`` (timed calls per figure), then
``hook_cache_hit_p95_ms`` (goal <= 5), ``hook_prefetch_overhead_ratio`` (p95 with full prefetch /
p95 bare inference, goal <= 1.2) and ``hook_fetch_minus_inference_p95_ms`` (p95 with FHIR fetching
- p95 bare inference, goal <= 25), the ratio and difference from the same run. The sekmet process
is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import httpx
from _common import cpu_threads, percentiles_ms, report, resolve_model, sekmet_server, timed_rounds

from cds_service.inference import ModelRuntime
from fhir_mappings import load_mappings

SERVICE_PATH = "/cds-services/ecglab-patient-view"
ORDER_SELECT_PATH = "/cds-services/ecglab-order-select"
FHIR_TOKEN = "benchmark-token"


def demo_subjects(patients: int, scratch: Path) -> list[Any]:
    """``patients`` demo subjects from a small generated MIMIC-layout set, as ``ecglab seed-fhir`` picks them."""
    from model_training.seed_fhir import read_subjects
    from model_training.synthetic import MIN_SUBJECTS, generate

    source = scratch / "synth"
    generate(source, max(2 * patients, MIN_SUBJECTS), 0, workers=1)
    return read_subjects(source, patients, 0, load_mappings())


def seed_patients(base_url: str, subjects: list[Any]) -> list[str]:
    """Write ``subjects`` to the server as ``ecglab seed-fhir`` does; ids of those with an inline ECG."""
    from model_training.seed_fhir import seed

    rows = seed(base_url, subjects, load_mappings())
    return [row["patient"] for row in rows if "via Binary" not in row["ecg"]]


def read_prefetch(client: httpx.Client, base_url: str, patient_id: str, queries: Any) -> dict[str, Any]:
    """The prefetch an EHR would send for ``patient_id``: each template's query (no date filter) run on the server."""
    prefetch: dict[str, Any] = {}
    for query in queries:
        if query.read:
            response = client.get(f"{base_url}/{query.resource_type}/{patient_id}")
        else:
            response = client.get(f"{base_url}/{query.resource_type}", params=query.bind(patient_id, None))
        response.raise_for_status()
        prefetch[query.key] = response.json()
    return prefetch


def extracted_inputs(prefetch: dict[str, Any], queries: Any, patient_id: str) -> Any:
    """The model inputs the service extracts from ``prefetch`` (for the bare inference figure).

    Through the service's own data path; with no FHIR client, a key missing from ``prefetch``
    stops the benchmark (``MissingData``).
    """
    from cds_service.fetch import gather_patient_data, model_inputs
    from cds_service.prefetch import decode_prefetch

    now = datetime.now(UTC)
    decoded = decode_prefetch(prefetch, queries)
    data = gather_patient_data(queries, patient_id, now=now, prefetched=decoded.resources)
    return model_inputs(data, mappings=load_mappings(), now=now)


def hook_body(
    patient_id: str,
    *,
    prefetch: dict[str, Any] | None = None,
    fhir: str | None = None,
    hook: str = "patient-view",
) -> dict[str, Any]:
    """A ``hook`` request: with ``prefetch``, or with ``fhirServer`` + ``fhirAuthorization``.

    ``order-select`` drafts no order (an empty ``draftOrders`` Bundle, one placeholder selection).
    """
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/benchmark", "patientId": patient_id},
    }
    if hook == "order-select":
        body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
        body["context"]["selections"] = ["ServiceRequest/none"]
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir is not None:
        body["fhirServer"] = fhir
        body["fhirAuthorization"] = {
            "access_token": FHIR_TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read",
            "subject": "ecglab",
        }
    return body


class HookCaller:
    """Posts pre-encoded hook requests in turn; keeps each answer to be checked after the timing.

    Bodies are JSON-encoded before the clock starts (a client's encoding is not service time), one
    per call so every request has its own ``hookInstance``. ``runs`` is how often each call must
    run the model (1; 0 for calls answered from the prediction cache).
    """

    def __init__(
        self,
        client: Any,
        runtime: ModelRuntime,
        bodies: Iterator[bytes],
        *,
        path: str = SERVICE_PATH,
        runs: int = 1,
    ) -> None:
        self.client, self.runtime, self.bodies = client, runtime, bodies
        self.path, self.runs = path, runs
        self.answers: list[tuple[int, bytes, int]] = []  # status, body, model runs during the call

    def __call__(self) -> None:
        """One hook call (the timed part)."""
        before = self.runtime.calls
        response = self.client.post(self.path, data=next(self.bodies), content_type="application/json")
        self.answers.append((response.status_code, response.get_data(), self.runtime.calls - before))

    def check(self) -> None:
        """Raise unless every call answered 200 with a ``cards`` list and ran the model ``runs`` times."""
        for status, body, runs in self.answers:
            if status != 200 or not isinstance(json.loads(body or b"{}").get("cards"), list):
                raise RuntimeError(f"hook call answered {status}: {body[:300]!r}")
            if runs != self.runs:
                raise RuntimeError(
                    f"hook call ran the model {runs} times, not {self.runs} (no usable ECG, or no cache hit?)"
                )


def main(argv: list[str] | None = None) -> int:
    """Parse options, set up server, data and app, time the calls and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: bundled, else random)"
    )
    parser.add_argument("--quick", action="store_true", help="a few calls and a tiny model (smoke test)")
    parser.add_argument(
        "--calls", type=int, default=None, help="timed calls per figure (default 40; --quick 3)"
    )
    parser.add_argument(
        "--patients", type=int, default=None, help="demo patients to seed (default 5; --quick 3)"
    )
    parser.add_argument("--threads", type=int, default=cpu_threads(), help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    calls = args.calls or (3 if args.quick else 40)
    patients = args.patients or (3 if args.quick else 5)
    if not 1 <= calls <= 10_000 or not 1 <= patients <= 50:
        parser.error("--calls must be in 1..10000 and --patients in 1..50")
    # The app logs a loud banner when auth is off, and one line per call; the figures are the output.
    logging.getLogger("cds_service").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="ecglab-bench-") as tmp:
        scratch = Path(tmp)
        model = resolve_model(args.model, args.quick, scratch)
        report("model", model.description)
        runtime = ModelRuntime.load(model.directory, ["CPUExecutionProvider"], intra_op_threads=args.threads)
        with sekmet_server(scratch) as server:
            subjects = demo_subjects(patients, scratch)  # while the server boots
            server.wait_ready()
            times = run_calls(
                runtime, server.base_url, seed_patients(server.base_url, subjects), calls, scratch
            )
    p95s: dict[str, float] = {}
    for name, key in (("hook_prefetch", "prefetch"), ("hook_fhir_fetch", "fhir"), ("bare_inference", "bare")):
        p50, p95s[key] = percentiles_ms(times[key])
        report(f"{name}_ms_p50", p50)
        report(f"{name}_ms_p95", p95s[key])
    report("hook_calls", calls)
    report("hook_cache_hit_p95_ms", percentiles_ms(times["cache_hit"])[1])
    report("hook_prefetch_overhead_ratio", p95s["prefetch"] / p95s["bare"])
    report("hook_fetch_minus_inference_p95_ms", p95s["fhir"] - p95s["bare"])
    return 0


def run_calls(
    runtime: ModelRuntime, base_url: str, ids: list[str], calls: int, scratch: Path
) -> dict[str, list[float]]:
    """Build the apps and time ``calls`` rounds of the four calls on patients ``ids`` (module docstring)."""
    from cds_service.app import create_app
    from cds_service.prefetch import build_queries

    if not ids:
        raise RuntimeError("no seeded patient has an ECG inside its resource; seed more patients")
    queries = build_queries(load_mappings())
    with httpx.Client(headers={"Accept": "application/fhir+json"}, timeout=30.0) as fhir:
        prefetches = {pid: read_prefetch(fhir, base_url, pid, queries) for pid in ids}
    inputs = {pid: extracted_inputs(prefetches[pid], queries, pid) for pid in ids}
    settings = {
        "auth": False,
        "issuers": "",
        "dev_fhir_servers": base_url,
        "database_url": f"sqlite:///{scratch / 'service.sqlite3'}",
        "budget_ms": 60_000,
        "fhir_timeout_ms": 30_000,
        "prediction_cache_s": 0,
    }
    app = create_app(settings, runtime=runtime)
    cached_app = create_app({**settings, "prediction_cache_s": 3600}, runtime=runtime)
    warmup = min(len(ids), 2)
    total = warmup + calls
    try:
        client = app.test_client()
        cached = cached_app.test_client()
        stored = HookCaller(
            cached,
            runtime,
            iter([json.dumps(hook_body(pid, prefetch=prefetches[pid])).encode() for pid in ids]),
        )
        for _ in ids:
            stored()  # patient-view once per patient: its prediction is stored
        stored.check()
        cache_hit = HookCaller(
            cached,
            runtime,
            iter(
                [
                    json.dumps(hook_body(pid, prefetch=prefetches[pid], hook="order-select")).encode()
                    for pid in islice(cycle(ids), total)
                ]
            ),
            path=ORDER_SELECT_PATH,
            runs=0,
        )
        with_prefetch = HookCaller(
            client,
            runtime,
            iter(
                [
                    json.dumps(hook_body(pid, prefetch=prefetches[pid])).encode()
                    for pid in islice(cycle(ids), total)
                ]
            ),
        )
        with_fetch = HookCaller(
            client,
            runtime,
            iter([json.dumps(hook_body(pid, fhir=base_url)).encode() for pid in islice(cycle(ids), total)]),
        )
        bare = cycle([inputs[pid] for pid in ids])
        times = timed_rounds(
            {
                "prefetch": with_prefetch,
                "fhir": with_fetch,
                "bare": lambda: runtime.predict(next(bare)),
                "cache_hit": cache_hit,
            },
            calls,
            warmup=warmup,
        )
        with_prefetch.check()
        with_fetch.check()
        cache_hit.check()
        return times
    finally:
        app.extensions["ecglab"].close()
        cached_app.extensions["ecglab"].close()


if __name__ == "__main__":
    sys.exit(main())
