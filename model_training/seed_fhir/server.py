"""Writing the demo patients to a FHIR R4 server, one transaction Bundle per patient.

:func:`seed` checks the server (``GET /metadata``), picks each patient's ECG carrier, moves its
times so that the ECG was taken a few minutes ago, and POSTs its Bundle. A server that cannot be
reached or rejects a Bundle raises :class:`~fhir_mappings.errors.InputError` naming the URL and
the patient.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from fhir_mappings.errors import InputError
from model_training.seed_fhir.resources import CARRIER_PLAN, carrier_for, patient_bundle
from model_training.seed_fhir.subjects import Subject, teaching_files


def post_transaction(client: httpx.Client, base_url: str, bundle: dict[str, Any], what: str) -> None:
    """POST a transaction Bundle; InputError naming the URL and ``what`` unless every entry succeeded."""
    try:
        response = client.post(base_url, json=bundle)
    except httpx.HTTPError as exc:
        raise InputError(f"{base_url}: cannot reach the FHIR server while writing {what} ({exc})") from exc
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if (
        response.status_code >= 400
        or not isinstance(body, dict)
        or body.get("type") != "transaction-response"
    ):
        raise InputError(
            f"{base_url}: transaction for {what} failed: HTTP {response.status_code}{_diagnostics(body)}"
        )
    failed = [
        (entry.get("response") or {}).get("status", "?")
        for entry in body.get("entry") or []
        if not str((entry.get("response") or {}).get("status", "")).startswith("2")
    ]
    if failed:
        raise InputError(
            f"{base_url}: transaction for {what}: {len(failed)} entries failed ({', '.join(map(str, failed[:3]))})"
        )


def _diagnostics(body: Any) -> str:
    """``: <first OperationOutcome diagnostics>`` when the body carries one."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            if text:
                return f": {str(text)[:300]}"
    return ""


def check_server(client: httpx.Client, base_url: str) -> None:
    """GET ``/metadata``: a clear error for a wrong URL or a server that is down."""
    try:
        response = client.get(f"{base_url}/metadata")
    except httpx.HTTPError as exc:
        raise InputError(f"{base_url}: cannot reach the FHIR server ({type(exc).__name__}: {exc})") from exc
    if response.status_code != 200:
        raise InputError(f"{base_url}/metadata: HTTP {response.status_code}; is this a FHIR R4 base URL?")


def seed(
    base_url: str,
    subjects: Sequence[Subject],
    mappings: Any,
    *,
    seed_value: int = 0,
    now: datetime | None = None,
    transport: httpx.BaseTransport | None = None,
) -> list[dict[str, Any]]:
    """Write one transaction per subject (carrier by position); return the summary rows."""
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    teaching = teaching_files()
    rng = random.Random(seed_value)
    rows = []
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    with httpx.Client(headers=headers, timeout=60.0, transport=transport, follow_redirects=False) as client:
        check_server(client, base_url)
        for index, subject in enumerate(subjects):
            carrier = carrier_for(index)
            if carrier.teaching and teaching is None:
                carrier = carrier_for(len(CARRIER_PLAN) + index)
            patient_id = f"ecglab-{subject.subject_id}"
            order_lab = mappings.labs[rng.randrange(len(mappings.labs))] if index % 2 == 1 else None
            ecg_time = now - timedelta(minutes=5 + 7 * index)
            bundle, row = patient_bundle(
                subject,
                carrier,
                patient_id,
                ecg_time,
                mappings,
                teaching=teaching,
                order_lab=order_lab,
                now=now,
            )
            post_transaction(client, base_url, bundle, f"Patient/{patient_id}")
            rows.append(row)
    return rows
