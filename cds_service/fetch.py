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
  with the FHIR client's attachment loader when there is a client;
* :func:`probe_predictions` — the prediction cache (:mod:`cds_service.prediction_cache`)
  consulted *before* the ECG is decoded: the key is built from the ECG resources within the
  maximum age (the same times and bounds as :func:`cds_service.ecg.select.select_ecg`) and the
  bytes behind their attachment URLs (fetched once; :func:`model_inputs` reuses them), then the
  metadata is extracted at the stored ECG's time and compared. A hit gives the model inputs
  without ECG samples and the stored predictions; :func:`remember_predictions` stores a miss's.

``now`` is the caller's one clock reading for the whole call: it dates the FHIR queries, the ECG's
maximum age and the feature windows alike. ``deadline`` is a :func:`time.monotonic` instant that
bounds every request (``None``: the client's own timeout only).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from cds_service.ecg.isolation import Decoder
from cds_service.ecg.select import EcgRecord, names_other_patient, recorded_at, within_max_age
from cds_service.features import ModelInputs, bind_to_patient, extract_metadata, extract_model_inputs
from cds_service.fhir_client import FhirClient, FhirTimeout, check_id
from cds_service.fhir_values import as_list, reference, resource_id, usable
from cds_service.patient_data import PatientData, assemble
from cds_service.prediction_cache import CachedPrediction, PredictionCache, metadata_digest, prediction_key
from cds_service.prefetch import PrefetchedResources, PrefetchQuery
from fhir_mappings.errors import EcglabError

if TYPE_CHECKING:
    from cds_service.hook_audit import InputFacts
    from cds_service.inference import TargetPrediction

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
    return assemble(resources, queries).bound_to(patient_id)


def model_inputs(
    data: PatientData,
    *,
    mappings: Any,
    now: datetime,
    client: FhirClient | None = None,
    deadline: float | None = None,
    fetched: Mapping[str, bytes | EcglabError] | None = None,
    decoder: Decoder | None = None,
) -> ModelInputs:
    """The model inputs of ``data`` at ``now``; attachments given by URL are read through ``client``.

    ``fetched`` holds what reading attachment URLs gave already (:attr:`CacheProbe.fetched`: the
    bytes, or the error): those URLs are not read again. ``decoder`` decodes the ECG in worker
    processes, abandoned at ``deadline`` (``None``: in this process, as the command line does).

    Raises:
        NoEcgError: no ECG recent enough.
        EcgRejected: every recent ECG is unusable; ``reason`` says why.
    """
    loader = None
    if client is not None:
        fetch = client.binary_loader(mappings.ecg.max_attachment_bytes, deadline=deadline)
        known = dict(fetched or {})

        def loader(url: str) -> bytes:
            if url not in known:
                return fetch(url)
            found = known[url]
            if isinstance(found, EcglabError):
                raise found
            return found

    return extract_model_inputs(
        data, mappings=mappings, now=now, binary_loader=loader, decoder=decoder, deadline=deadline
    )


# -- the prediction cache -------------------------------------------------------------------------------

MAX_KEYED_ATTACHMENTS: int = 4
"""Attachment URLs read to build a key at most; a call with more does not use the cache."""


@dataclass
class CacheProbe:
    """The prediction cache consulted for one call before its ECG is decoded.

    ``key`` is ``None`` when the cache cannot be used for this call (no recent ECG, too many
    attachment URLs, one that could not be read). On a hit, ``hit`` is the stored prediction and
    ``inputs`` the model inputs without ECG samples (the ECG's reference, time, rate and leads,
    the metadata extracted now). ``newest`` is the reference of the ECG the selection tries first;
    ``fetched`` what reading attachment URLs for the key gave (bytes, or the error), by URL.
    """

    key: str | None = None
    newest: str | None = None
    hit: CachedPrediction | None = None
    inputs: ModelInputs | None = None
    fetched: dict[str, bytes | EcglabError] = field(default_factory=dict)

    def stores(self, inputs: ModelInputs) -> bool:
        """Whether a miss's prediction from ``inputs`` is kept: a key, and the newest recent ECG was used.

        An older ECG stands in only when the newest could not be decoded, which a retry may not
        repeat (a decode past its deadline): such a prediction is not reused.
        """
        return self.key is not None and self.hit is None and inputs.ecg.reference == self.newest


def _recent_ecgs(data: PatientData, mappings: Any, now: datetime) -> list[tuple[dict[str, Any], datetime]]:
    """The ECG resources within the maximum age at ``now``, in their order (of any status, code or subject:
    a key over more resources than the selection reads only misses more often)."""
    recent = []
    for resource in data.ecgs:
        at = recorded_at(resource) if isinstance(resource, dict) else None
        if at is not None and within_max_age(at, now, mappings.ecg):
            recent.append((resource, at))
    return recent


def _attachment_urls(resource: Mapping[str, Any]) -> list[str]:
    """URLs of the attachments of a Media or DocumentReference that carry no inline data."""
    if resource.get("resourceType") == "Media":
        attachments = [resource.get("content")]
    else:
        attachments = [
            c.get("attachment") for c in as_list(resource.get("content")) if isinstance(c, Mapping)
        ]
    return [
        a["url"]
        for a in attachments
        if isinstance(a, Mapping) and not a.get("data") and isinstance(a.get("url"), str) and a["url"]
    ]


def probe_predictions(
    data: PatientData,
    cache: PredictionCache,
    *,
    mappings: Any,
    now: datetime,
    client: FhirClient | None = None,
    deadline: float | None = None,
    need_input_facts: bool = False,
    context_patient: str | None = None,
) -> CacheProbe:
    """Look the call's prediction up before decoding (module docstring; :mod:`cds_service.prediction_cache`).

    ``need_input_facts``: an entry stored without the audit's input facts does not count (the
    audit is on). ``context_patient`` (the hook's ``context.patientId``) is part of the key, so no
    entry serves another patient's call. Counts a hit or a miss whenever a key could be built.
    """
    bound = bind_to_patient(data, data.patient_id) if data.patient_id is not None else data
    patient_id = bound.patient_id or resource_id(bound.patient)
    recent = _recent_ecgs(bound, mappings, now)
    if not recent:
        return CacheProbe()
    urls = list(dict.fromkeys(url for resource, _ in recent for url in _attachment_urls(resource)))
    probe = CacheProbe()
    attachments: dict[str, bytes] = {}
    if urls:
        if client is None or len(urls) > MAX_KEYED_ATTACHMENTS:
            return probe
        fetch = client.binary_loader(mappings.ecg.max_attachment_bytes, deadline=deadline)
        for url in urls:
            try:
                attachments[url] = fetch(url)
            except EcglabError as exc:  # no key; the selection gets this error and rejects that ECG
                probe.fetched = {**attachments, url: exc}
                return probe
        probe.fetched = dict(attachments)
    candidates = [
        (r, at)
        for r, at in recent
        if usable(r) and (patient_id is None or not names_other_patient(r, patient_id))
    ]
    if candidates:
        latest = max(at for _, at in candidates)
        probe.newest = reference(next(r for r, at in candidates if at == latest))
    ids = [context_patient, data.patient_id, resource_id(bound.patient)]
    try:
        probe.key = prediction_key(cache.model, ids, [r for r, _ in recent], attachments)
    except RecursionError:  # a resource nested past Python's limit: no key, decoding decides
        return probe
    found = cache.get(probe.key)
    tier = None
    if found is not None and not (need_input_facts and found[0].input_facts is None):
        entry = found[0]
        metadata, sources = extract_metadata(
            bound.patient, bound.observations, mappings, entry.ecg_recorded_at, patient_id=patient_id
        )
        if metadata_digest(metadata) == entry.metadata_sha256:
            probe.hit, tier = entry, found[1]
            probe.inputs = ModelInputs(ecg=_unsampled_ecg(entry), metadata=metadata, sources=sources)
    cache.counted(tier)
    return probe


def remember_predictions(
    cache: PredictionCache,
    probe: CacheProbe,
    inputs: ModelInputs,
    predictions: Sequence[TargetPrediction],
    input_facts: InputFacts | None,
) -> bool:
    """Store a miss's predictions under the probe's key, when the ECG used is the newest recent one.

    Returns whether it was stored (:meth:`CacheProbe.stores`).
    """
    if not probe.stores(inputs) or probe.key is None:
        return False
    ecg = inputs.ecg
    cache.put(
        probe.key,
        CachedPrediction(
            predictions=tuple(predictions),
            metadata_sha256=metadata_digest(inputs.metadata),
            ecg_reference=ecg.reference,
            ecg_recorded_at=ecg.recorded_at,
            ecg_carrier=ecg.carrier,
            ecg_fs=float(ecg.fs),
            ecg_lead_names=tuple(ecg.lead_names),
            input_facts=input_facts,
        ),
    )
    return True


def _unsampled_ecg(entry: CachedPrediction) -> EcgRecord:
    """The stored ECG's facts as an :class:`EcgRecord` without samples (cards and audit need no more)."""
    empty = np.empty((0, len(entry.ecg_lead_names)), dtype=np.float32)
    return EcgRecord(
        empty,
        entry.ecg_fs,
        entry.ecg_lead_names,
        entry.ecg_recorded_at,
        entry.ecg_reference,
        entry.ecg_carrier,
    )
