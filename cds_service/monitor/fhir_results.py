"""Read lab result Observations from a FHIR server by code and date, keyed by hashed patient.

The monitor does not know any patient id: the audit trail holds only keyed hashes. So it asks the
FHIR server for every result of a lab in the monitoring period (``Observation?code=<LOINC
list>&date=ge…&date=le…``, the lab's result codes from ``fhir_mappings``), follows
``Bundle.link[next]`` while it stays on the server's origin, and turns each result's
``subject`` into the same HMAC the service wrote (:func:`cds_service.audit.patient_key`).
Patient ids exist only inside :func:`parse_result` and are never stored, logged or reported.

A result is used when its status is ``final``, ``amended`` or ``corrected``, it has an effective
time, a numeric ``valueQuantity`` and a unit that is the lab's own: the UCUM ``code`` or the
``unit`` text equals ``labs.yaml``'s unit or the manifest label's unit (MIMIC's spelling, e.g.
``mEq/L`` for potassium's ``mmol/L``); a value without any unit is taken as being in it.
Everything else is counted by reason in the report, never silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from cds_service.audit import patient_key
from cds_service.monitor.outcomes import LabResult
from fhir_mappings import LabSpec
from fhir_mappings.errors import InputError

log = logging.getLogger(__name__)

USABLE_STATUSES = frozenset({"final", "amended", "corrected"})
PAGE_SIZE = 200
MAX_PAGES = 100_000


@dataclass
class FetchStats:
    """How many results were read and why the others were not used."""

    pages: int = 0
    read: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Count one unusable result under ``reason``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _fhir_instant(moment: datetime) -> str:
    """A FHIR search date prefix argument in UTC, seconds precision."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """A FHIR dateTime/instant with a time as aware UTC (no zone = UTC); ``None`` for dates or junk."""
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


def _effective(resource: Mapping[str, Any]) -> datetime | None:
    """``effectiveDateTime``, ``effectiveInstant`` or ``effectivePeriod.start``."""
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in resource:
            return parse_time(resource[key])
    period = resource.get("effectivePeriod")
    return parse_time(period.get("start")) if isinstance(period, dict) else None


def _subject_id(resource: Mapping[str, Any]) -> str | None:
    """The Patient id of ``subject.reference`` (relative or absolute), else ``None``."""
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    if not isinstance(reference, str):
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    if len(parts) >= 4 and parts[-4] == "Patient" and parts[-2] == "_history":
        return parts[-3]
    return None


def parse_result(
    resource: Any, lab: LabSpec, key: bytes, stats: FetchStats, also_units: Collection[str] = ()
) -> LabResult | None:
    """A :class:`LabResult` of ``lab`` from one Observation, or ``None`` (reason counted in ``stats``).

    ``also_units`` are unit spellings accepted besides ``lab.unit`` (the manifest's).
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "Observation":
        stats.skip("not_an_observation")
        return None
    codings = (resource.get("code") or {}).get("coding") or []
    if not any(isinstance(c, dict) and lab.has_result_code(c.get("system"), c.get("code")) for c in codings):
        stats.skip("other_code")
        return None
    if resource.get("status") not in USABLE_STATUSES:
        stats.skip("status")
        return None
    quantity = resource.get("valueQuantity")
    if not isinstance(quantity, dict):
        stats.skip("no_numeric_value")
        return None
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        stats.skip("no_numeric_value")
        return None
    units = {quantity.get("code"), quantity.get("unit")} - {None}
    if units and not units & {lab.unit, *also_units}:
        stats.skip("other_unit")
        return None
    when = _effective(resource)
    if when is None:
        stats.skip("no_effective_time")
        return None
    subject = _subject_id(resource)
    if subject is None:
        stats.skip("no_patient_subject")
        return None
    stats.used += 1
    return LabResult(patient_key(key, subject), lab.key, when, float(value))


def _same_origin(url: str, base: str) -> bool:
    """Whether ``url`` has the scheme, host and port of ``base``."""
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def _pages(
    client: httpx.Client, base_url: str, params: Mapping[str, Any], stats: FetchStats
) -> Iterator[list[Any]]:
    """The entries of each page of one search (paging stops at another origin)."""
    url: str | None = f"{base_url}/Observation"
    query: Mapping[str, Any] | None = params
    while url is not None and stats.pages < MAX_PAGES:
        try:
            response = client.get(url, params=query)
        except httpx.HTTPError as exc:
            raise InputError(f"FHIR server {urlsplit(base_url).netloc}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise InputError(
                f"FHIR server {urlsplit(base_url).netloc}: Observation search answered HTTP {response.status_code}"
            )
        try:
            bundle = response.json()
        except ValueError:
            raise InputError(f"FHIR server {urlsplit(base_url).netloc}: search answer is not JSON") from None
        stats.pages += 1
        entries = bundle.get("entry") if isinstance(bundle, dict) else None
        yield [e.get("resource") for e in entries or [] if isinstance(e, dict)]
        url, query = None, None
        for link in bundle.get("link") or [] if isinstance(bundle, dict) else []:
            if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
                if _same_origin(link["url"], base_url):
                    url = link["url"]
                else:
                    log.warning("next-page link leaves the FHIR server's origin; paging stopped")


def fetch_lab_results(
    base_url: str,
    labs: Sequence[LabSpec],
    start: datetime,
    end: datetime,
    key: bytes,
    *,
    token: str | None = None,
    timeout_s: float = 30.0,
    transport: httpx.BaseTransport | None = None,
    units: Mapping[str, Collection[str]] | None = None,
    on_page: Callable[[str, int], None] | None = None,
) -> tuple[list[LabResult], FetchStats]:
    """Every usable result of ``labs`` with an effective time in ``[start, end]``.

    ``units`` maps a lab key to further accepted unit spellings; ``on_page(lab_key, n_entries)``
    is called after each page (progress display).
    """
    base = base_url.rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--fhir-url: expected an http(s) URL, got {base_url!r}")
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    stats = FetchStats()
    results: list[LabResult] = []
    with httpx.Client(
        headers=headers, timeout=timeout_s, transport=transport, follow_redirects=False
    ) as client:
        for lab in labs:
            params = {
                "code": ",".join(f"{c.system}|{c.code}" for c in lab.result_codes),
                "date": [f"ge{_fhir_instant(start)}", f"le{_fhir_instant(end)}"],
                "_count": str(PAGE_SIZE),
            }
            for resources in _pages(client, base, params, stats):
                for resource in resources:
                    stats.read += 1
                    parsed = parse_result(resource, lab, key, stats, (units or {}).get(lab.key, ()))
                    if parsed is not None and start <= parsed.time <= end:
                        results.append(parsed)
                    elif parsed is not None:
                        stats.used -= 1
                        stats.skip("outside_period")
                if on_page is not None:
                    on_page(lab.key, len(resources))
    return results, stats
