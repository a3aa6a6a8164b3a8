"""The one data path: the prefetch keys still missing are read from FHIR, then the model inputs.

Every caller that turns a patient into model inputs goes through these functions: the hook
pipeline (:mod:`cds_service.hooks`), ``ecglab score --fhir`` (:mod:`cds_service.score`), the
``/demo`` page (:mod:`cds_service.demo_page`) and the hook benchmark (``benchmarks/hooks.py``).

* :func:`gather_patient_data` — the patient's :class:`PatientData` from what was prefetched plus
  exactly the keys that were not (every key when nothing was prefetched), fetched concurrently
  by :func:`fetch_keys`, each with the same :class:`~cds_service.prefetch.PrefetchQuery` the
  discovery template renders, bound with its date filter at ``now``. A prefetched Bundle with a
  ``next`` link is continued in the same concurrent batch (:meth:`FhirClient.next_pages`: only
  under the ``fhirServer`` base, at most the client's page limit counting the prefetched page,
  each page within the deadline), so an order or result on page 2 counts like one on page 1.
  Without a client (no ``fhirServer`` and token) the first page is used and the cut is logged;
* :func:`model_inputs` — :func:`cds_service.features.extract_model_inputs` at the same ``now``,
  with the FHIR client's attachment loader when there is a client.

``now`` is the caller's one clock reading for the whole call: it dates the FHIR queries, the ECG's
maximum age and the feature windows alike. ``deadline`` is a :func:`time.monotonic` instant that
bounds every request (``None``: the client's own timeout only).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from cds_service.features import ModelInputs, extract_model_inputs
from cds_service.fhir_client import FhirClient, FhirTimeout, check_id
from cds_service.patient_data import PatientData, assemble
from cds_service.prefetch import PrefetchedResources, PrefetchQuery
from fhir_mappings.errors import EcglabError

log = logging.getLogger(__name__)

Resources = dict[str, list[dict[str, Any]]]
"""Resources per prefetch key."""


class MissingData(EcglabError):
    """Keys are missing and there is no FHIR client to fetch them with (the hook answers 412)."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__("no FHIR client to fetch prefetch keys " + ", ".join(keys))
        self.keys = list(keys)


def missing_keys(queries: Sequence[PrefetchQuery], prefetched: Mapping[str, Any] | None) -> list[str]:
    """The keys of ``queries`` that ``prefetched`` does not satisfy, in query order."""
    given = prefetched or {}
    return [query.key for query in queries if query.key not in given]


def fetch_keys(
    client: FhirClient,
    queries: Sequence[PrefetchQuery],
    keys: Sequence[str],
    patient_id: str,
    *,
    now: datetime,
    deadline: float | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> Resources:
    """Run the queries of ``keys`` concurrently on ``executor``; the first failure wins.

    Each query is bound with ``patient_id`` and its date filter at ``now``. Without an executor a
    pool of one thread per key serves this call only.

    Raises:
        InputError: ``patient_id`` is not a FHIR id.
        FhirError: the first failure among the requests (unknown patient → FhirNotFound);
            :class:`FhirTimeout` when the deadline passes first.
    """
    fetched, _ = _fetch(client, queries, keys, {}, patient_id, now=now, deadline=deadline, executor=executor)
    return fetched


def _fetch(
    client: FhirClient,
    queries: Sequence[PrefetchQuery],
    keys: Sequence[str],
    next_pages: Mapping[str, str],
    patient_id: str,
    *,
    now: datetime,
    deadline: float | None,
    executor: concurrent.futures.Executor | None,
) -> tuple[Resources, Resources]:
    """The queries of ``keys`` and the continuations of ``next_pages``, all in one concurrent batch.

    Returns (resources per fetched key, further resources per continued prefetched key). A
    continuation reads at most ``client.max_pages - 1`` pages: the prefetched one was the first.
    """
    check_id(patient_id, "patient id")
    by_key = {query.key: query for query in queries}
    jobs: list[tuple[str, bool, Callable[[], Any]]] = []
    for key in keys:
        query = by_key[key]
        if query.read:
            jobs.append((key, False, _bound(client.read, query.resource_type, patient_id, deadline=deadline)))
        else:
            params = query.bind(patient_id, now)
            jobs.append((key, False, _bound(client.search, query.resource_type, params, deadline=deadline)))
    for key, url in next_pages.items():
        pages = client.max_pages - 1
        jobs.append(
            (
                key,
                True,
                _bound(client.next_pages, by_key[key].resource_type, url, pages=pages, deadline=deadline),
            )
        )
    started = time.perf_counter()
    results = _run_concurrently([job for _, _, job in jobs], deadline=deadline, executor=executor)
    fetched: Resources = {}
    continued: Resources = {}
    for (key, is_continuation, _), value in zip(jobs, results, strict=True):
        found = [value] if isinstance(value, dict) else list(value)
        (continued if is_continuation else fetched)[key] = found
    log.debug(
        "FHIR fetch of %d key(s), %d continued: %d resources in %.0f ms",
        len(fetched),
        len(continued),
        sum(len(found) for found in (*fetched.values(), *continued.values())),
        1000 * (time.perf_counter() - started),
    )
    return fetched, continued


def _bound(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """``function`` with its arguments bound, as a job for :func:`_run_concurrently`."""
    return lambda: function(*args, **kwargs)


def _run_concurrently(
    jobs: Sequence[Callable[[], Any]],
    *,
    deadline: float | None,
    executor: concurrent.futures.Executor | None,
) -> list[Any]:
    """The results of ``jobs`` in order, run concurrently; the first failure wins.

    Raises:
        Exception: the first job's error; :class:`FhirTimeout` when the deadline passes first.
    """
    if not jobs:
        return []
    own = executor is None
    pool = executor or concurrent.futures.ThreadPoolExecutor(
        max_workers=len(jobs), thread_name_prefix="ecglab-fetch"
    )
    futures: list[concurrent.futures.Future[Any]] = []
    try:
        futures = [pool.submit(job) for job in jobs]
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done, pending = concurrent.futures.wait(
            futures, timeout=remaining, return_when=concurrent.futures.FIRST_EXCEPTION
        )
        for future in pending:
            future.cancel()
        for future in done:
            error = future.exception()
            if error is not None:
                raise error
        if pending:
            raise FhirTimeout(f"{len(pending)} of {len(futures)} FHIR requests missed the deadline")
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)
    return [future.result() for future in futures]


def _merge(first: list[dict[str, Any]], more: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prefetched page followed by the further pages' resources not already on it (by type and id)."""
    seen = {(r.get("resourceType"), r.get("id")) for r in first if r.get("id")}
    return first + [r for r in more if not r.get("id") or (r.get("resourceType"), r.get("id")) not in seen]


def gather_patient_data(
    queries: Sequence[PrefetchQuery],
    patient_id: str,
    *,
    now: datetime,
    prefetched: Mapping[str, list[dict[str, Any]]] | None = None,
    client: FhirClient | None = None,
    deadline: float | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> PatientData:
    """The patient's data: ``prefetched`` keys as given, every other key of ``queries`` fetched.

    Args:
        queries: the prefetch queries (:func:`cds_service.prefetch.build_queries`).
        patient_id: the FHIR Patient id (the hook's ``context.patientId``).
        now: the one reference time of the call (dates the queries' filters).
        prefetched: decoded prefetch resources per key (:func:`cds_service.prefetch.decode_prefetch`);
            ``None`` or empty: fetch every key. When it is a
            :class:`~cds_service.prefetch.PrefetchedResources` with ``next_pages``, those Bundles
            are continued through ``client`` (first page only without one).
        client: the FHIR client for the keys that are missing.
        deadline: :func:`time.monotonic` instant by which every request must be back.
        executor: where the requests run concurrently (the app's FHIR pool; default: one per call).

    Raises:
        MissingData: keys are missing and ``client`` is ``None``.
        InputError, FhirError: as :func:`fetch_keys`.
    """
    resources: Resources = dict(prefetched or {})
    next_pages = dict(prefetched.next_pages) if isinstance(prefetched, PrefetchedResources) else {}
    missing = missing_keys(queries, resources)
    if missing and client is None:
        raise MissingData(missing)
    if next_pages and (client is None or client.max_pages < 2):
        log.info(
            "prefetched %s: more pages exist but %s; only the first page is used",
            ", ".join(sorted(next_pages)),
            "there is no FHIR access (fhirServer and token)" if client is None else "the page limit is 1",
        )
        next_pages = {}
    if client is not None and (missing or next_pages):
        fetched, continued = _fetch(
            client, queries, missing, next_pages, patient_id, now=now, deadline=deadline, executor=executor
        )
        resources.update(fetched)
        for key, more in continued.items():
            resources[key] = _merge(resources.get(key, []), more)
    return assemble(resources, queries)


def model_inputs(
    data: PatientData,
    *,
    mappings: Any,
    now: datetime,
    client: FhirClient | None = None,
    deadline: float | None = None,
) -> ModelInputs:
    """The model inputs of ``data`` at ``now``; attachments given by URL are read through ``client``.

    Raises:
        NoEcgError: no ECG recent enough.
        EcgRejected: every recent ECG is unusable; ``reason`` says why.
    """
    loader = None
    if client is not None:
        loader = client.binary_loader(mappings.ecg.max_attachment_bytes, deadline=deadline)
    return extract_model_inputs(data, mappings=mappings, now=now, binary_loader=loader)
