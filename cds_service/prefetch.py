"""Prefetch: the one set of FHIR queries of a hook call, and decoding what the EHR sends for them.

Each :class:`PrefetchQuery` is one prefetch key, built from ``fhir_mappings`` so that the codes
the EHR is asked for are exactly the codes the feature extractor reads. The same objects serve
both routes to the data: discovery renders them as templates, and when a key is missing the
service binds the very same query and runs it itself (:mod:`cds_service.fetch`). Prefetched and
self-fetched data are therefore the same query, whatever the EHR sent.

Templates use only the CDS Hooks 2.0 "recommended subset" (instance read, ``subject=Patient/…``
reference search, token ``code=`` lists, ``_sort``, ``_count``): 2.0 has no relative dates, so
a template carries no date filter. A query bound by the service adds its :class:`DateFilter`
(``date=ge…``/``created=ge…``) computed from the caller's clock: the oldest ECG the model accepts
(``ecg.max_age_minutes``), minus the widest feature window for vital signs and biometrics, and
:data:`LAB_LOOKBACK` for lab results. The feature extractor applies the exact windows to whatever
arrives, so the filter only trims what cannot matter.

Decoding follows the prefetch-state table of cdshooks.md §4 (HAPI's auto-prefetch rules):

=========================================  =================================================
value sent for a key                       meaning here
=========================================  =================================================
key absent                                 not satisfied: fetch it ourselves, else 412
``null``                                   queried, nothing found: no data, no re-query
``OperationOutcome``                       the client hit an error: treated as absent
Bundle with an error/fatal OperationOutcome the query failed: treated as absent
Bundle whose OperationOutcome entries are  Epic's "no results" (``search.mode = outcome``):
only warnings/information                  the other entries are the answer (often none)
Bundle / resource                          the answer; entries of other resource types skipped
anything else (a string, a number)         malformed: treated as absent
=========================================  =================================================

A searchset Bundle may be only the first page: its ``link[next]`` is kept
(:attr:`PrefetchedResources.next_pages`) and :func:`cds_service.fetch.gather_patient_data`
follows it through the FHIR client when the request allows FHIR access, so an active order or a
recent result on page 2 counts like one on page 1. Without FHIR access the first page is used and
the cut is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cds_service.fhir_client import next_link
from fhir_mappings import Coding, Mappings

log = logging.getLogger(__name__)

PATIENT_TOKEN = "{{context.patientId}}"
MAX_TEMPLATE_CHARS = 1800  # well under the ~2 KB GET limit of older proxies and browsers
PAGE_SIZE = 100  # vital-sign, biometric and lab Observations, ServiceRequests
ECG_COUNT = 5  # ECG resources carry the waveform (hundreds of KB each): only the newest few
LAB_LOOKBACK = timedelta(days=7)
"""How far back the service reads lab results itself (cards skip recently resulted labs)."""

DataField = Literal["patient", "observations", "ecgs", "lab_results", "service_requests"]

#: Prefetch keys, in the order they appear in discovery.
PATIENT, VITALS, ECG_OBSERVATIONS, ECG_MEDIA, ECG_DOCUMENTS, LABS, ORDERS = (
    "patient",
    "vitals",
    "ecgObservations",
    "ecgMedia",
    "ecgDocuments",
    "labs",
    "orders",
)


@dataclass(frozen=True)
class DateFilter:
    """The date filter a self-fetched search adds: ``param=ge<now - lookback>``.

    ``param`` is the search parameter on the resource's clinically relevant time (``date`` for
    Observation and DocumentReference, ``created`` for Media).
    """

    param: str
    lookback: timedelta

    def bind(self, now: datetime) -> tuple[str, str]:
        """The search parameter for the reference time ``now`` (a FHIR instant in UTC, ``Z`` suffix)."""
        since = (now - self.lookback).astimezone(UTC)
        return (self.param, "ge" + since.strftime("%Y-%m-%dT%H:%M:%SZ"))


@dataclass(frozen=True)
class PrefetchQuery:
    """One prefetch key: a FHIR read or search on the current patient, and where its data goes.

    ``params`` values may contain ``{{context.patientId}}``; :meth:`template` renders the discovery
    string, :meth:`bind` the concrete query the service runs itself (values are URL-encoded by the
    HTTP client, never spliced into a URL by hand). ``since`` is the date filter of that concrete
    query; templates leave it out.
    """

    key: str
    target: DataField
    resource_type: str
    params: tuple[tuple[str, str], ...] = ()
    read: bool = False
    since: DateFilter | None = None

    def template(self) -> str:
        """The discovery template string, e.g. ``Observation?patient={{context.patientId}}&code=...``."""
        if self.read:
            return f"{self.resource_type}/{PATIENT_TOKEN}"
        return f"{self.resource_type}?" + "&".join(f"{name}={value}" for name, value in self.params)

    def bind(self, patient_id: str, now: datetime | None) -> list[tuple[str, str]]:
        """Search parameters with the patient id filled in (for :meth:`FhirClient.search`).

        With ``now`` the date filter is added before the result parameters (``_sort``,
        ``_count``); with ``None`` the query is the template's, as an EHR runs it for prefetch.
        """
        params = [(name, value.replace(PATIENT_TOKEN, patient_id)) for name, value in self.params]
        if now is not None and self.since is not None:
            at = next((i for i, (name, _) in enumerate(params) if name.startswith("_")), len(params))
            params.insert(at, self.since.bind(now))
        return params


class PrefetchedResources(dict[str, list[dict[str, Any]]]):
    """Resources per satisfied prefetch key, and the ``next`` link of each Bundle that has more pages.

    A plain dict of key → resources (compares equal to one) that also carries ``next_pages``
    (key → the Bundle's ``link[next]`` URL, as sent), so that the hook pipeline hands both to
    :func:`cds_service.fetch.gather_patient_data` as its one ``prefetched`` argument.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.next_pages: dict[str, str] = {}


@dataclass
class DecodedPrefetch:
    """What the prefetch gave, per key: resources for satisfied keys, and the keys still missing."""

    resources: PrefetchedResources = field(default_factory=PrefetchedResources)
    missing: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # key -> why it counts as missing (for logs)

    @property
    def next_pages(self) -> dict[str, str]:
        """Key → ``next`` link of the prefetched Bundles that are not complete."""
        return self.resources.next_pages


def code_param(codings: Iterable[Coding], *, budget: int) -> str:
    """A ``code=`` token list: ``system|code`` pairs when they fit ``budget`` characters, else bare codes.

    Bare codes still match (a token search without a system matches any system); they are only
    used when the qualified list would make the URL longer than older proxies accept.
    """
    unique = list(dict.fromkeys((c.system, c.code) for c in codings))
    qualified = ",".join(f"{s}|{c}" if s else str(c) for s, c in unique)
    if len(qualified) <= budget:
        return qualified
    return ",".join(dict.fromkeys(str(c) for _, c in unique))


def build_queries(mappings: Mappings) -> tuple[PrefetchQuery, ...]:
    """The prefetch queries, built from the feature, lab, order and ECG codes of ``fhir_mappings``.

    Date filters (module docstring): ECG searches look back ``ecg.max_age_minutes``, the vital
    sign and biometric search that plus the widest feature window before the ECG, lab results
    :data:`LAB_LOOKBACK`; the Patient read and the open orders have none. A query whose code
    list would be empty is left out.
    """
    vital_codes: list[Coding] = []
    widest_window = 0
    for spec in mappings.features:
        source = spec.fhir
        if source.kind != "observation":
            continue
        vital_codes.extend(source.codes)
        vital_codes.extend(ref.panel for ref in source.components)
        if spec.window is not None:
            widest_window = max(widest_window, int(spec.window.before_min))
    lab_codes = [coding for lab in mappings.labs for coding in lab.result_codes]
    order_codes = [lab.order_code for lab in mappings.labs if lab.order_code is not None]
    ecg = mappings.ecg
    subject = ("subject", f"Patient/{PATIENT_TOKEN}")
    budget = MAX_TEMPLATE_CHARS - 120
    ecg_age = timedelta(minutes=int(ecg.max_age_minutes))
    since: dict[str, DateFilter] = {
        VITALS: DateFilter("date", ecg_age + timedelta(minutes=widest_window)),
        ECG_OBSERVATIONS: DateFilter("date", ecg_age),
        ECG_MEDIA: DateFilter("created", ecg_age),
        ECG_DOCUMENTS: DateFilter("date", ecg_age),
        LABS: DateFilter("date", LAB_LOOKBACK),
    }

    def search(key: str, target: DataField, resource_type: str, *params: tuple[str, str]) -> PrefetchQuery:
        """A search query on the current patient (``subject=Patient/{{context.patientId}}`` first)."""
        return PrefetchQuery(key, target, resource_type, (subject, *params), since=since.get(key))

    queries = [PrefetchQuery(PATIENT, "patient", "Patient", read=True)]
    if vital_codes:
        queries.append(
            search(
                VITALS,
                "observations",
                "Observation",
                ("code", code_param(vital_codes, budget=budget)),
                ("_sort", "-date"),
                ("_count", str(PAGE_SIZE)),
            )
        )
    if ecg.observation_codes:
        queries.append(
            search(
                ECG_OBSERVATIONS,
                "ecgs",
                "Observation",
                ("code", code_param(ecg.observation_codes, budget=budget)),
                ("_sort", "-date"),
                ("_count", str(ECG_COUNT)),
            )
        )
    if ecg.media_codes:  # Media has no portable code search: its codes are checked after fetching
        queries.append(search(ECG_MEDIA, "ecgs", "Media", ("_sort", "-created"), ("_count", str(ECG_COUNT))))
    if ecg.document_codes:
        queries.append(
            search(
                ECG_DOCUMENTS,
                "ecgs",
                "DocumentReference",
                ("type", code_param(ecg.document_codes, budget=budget)),
                ("_sort", "-date"),
                ("_count", str(ECG_COUNT)),
            )
        )
    if lab_codes:
        queries.append(
            search(
                LABS,
                "lab_results",
                "Observation",
                ("code", code_param(lab_codes, budget=budget)),
                ("_sort", "-date"),
                ("_count", str(PAGE_SIZE)),
            )
        )
    if order_codes:
        queries.append(
            search(
                ORDERS,
                "service_requests",
                "ServiceRequest",
                ("status", "active,draft"),
                ("code", code_param(order_codes, budget=budget)),
                ("_count", str(PAGE_SIZE)),
            )
        )
    return tuple(queries)


def templates(queries: Sequence[PrefetchQuery]) -> dict[str, str]:
    """The discovery ``prefetch`` object: key → template string."""
    return {q.key: q.template() for q in queries}


# -- decoding ---------------------------------------------------------------------------------------


def _outcome_is_error(resource: Mapping[str, Any]) -> bool:
    """Whether an OperationOutcome reports a failure (error/fatal issue, or no issues at all)."""
    issues = resource.get("issue")
    if not isinstance(issues, list) or not issues:
        return True  # an OperationOutcome with no issues says nothing useful: count it as a failure
    return any(isinstance(i, dict) and i.get("severity") in ("error", "fatal") for i in issues)


def decode_value(value: Any, query: PrefetchQuery) -> tuple[list[dict[str, Any]] | None, str | None]:
    """One prefetch value → (resources of the query's type, None) or (None, why it counts as missing)."""
    if value is None:
        return [], None
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        return None, "not a FHIR resource"
    kind = value["resourceType"]
    if kind == "OperationOutcome":
        return None, "OperationOutcome"
    if kind == "Bundle":
        entries = value.get("entry") or []
        if not isinstance(entries, list):
            return None, "Bundle.entry is not a list"
        found: list[dict[str, Any]] = []
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                continue
            if resource.get("resourceType") == "OperationOutcome":
                if _outcome_is_error(resource):
                    return None, "Bundle carries an error OperationOutcome"
                continue
            if resource.get("resourceType") == query.resource_type:
                found.append(resource)
        return found, None
    if kind == query.resource_type:
        return [value], None
    return None, f"unexpected resourceType {kind}"


def bundle_next_link(value: Any) -> str | None:
    """The ``link[next]`` URL of a prefetched Bundle, or ``None`` (not a Bundle, or its last page)."""
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        return None
    link = next_link(value)
    return link if link and link.strip() else None


def decode_prefetch(prefetch: Mapping[str, Any] | None, queries: Sequence[PrefetchQuery]) -> DecodedPrefetch:
    """Sort the request's prefetch into satisfied keys (with their resources) and missing keys.

    A satisfied search key whose Bundle links a ``next`` page gets that link in
    :attr:`DecodedPrefetch.next_pages` (the key stays satisfied: its first page is an answer).
    """
    decoded = DecodedPrefetch()
    given = prefetch or {}
    for query in queries:
        if query.key not in given:
            decoded.missing.append(query.key)
            continue
        resources, problem = decode_value(given[query.key], query)
        if resources is None:
            decoded.missing.append(query.key)
            decoded.notes[query.key] = problem or "unusable"
        else:
            decoded.resources[query.key] = resources
            link = None if query.read else bundle_next_link(given[query.key])
            if link is not None:
                decoded.resources.next_pages[query.key] = link
    return decoded
