"""Malformed requests: property-based fuzzing of hook requests, prefetch contents and feedback bodies.

cdshooks.md §7: a malformed body is a 400, unobtainable data a 412, and no input may make the
service fail (a 5xx, or a traceback in its log). §0.7 asks for leniency: unknown fields, vendor
extensions and odd-but-legal shapes are accepted, not refused. Hypothesis generates requests that
mix valid-shaped structures with broken ones — wrong JSON types, missing and extra fields, huge
strings, deep nesting, unicode, raw bytes that are not JSON, FHIR resources of the wrong shape in
the prefetch — and posts them through the Flask test client (in process, so 10 000+ requests fit
in the fast suite). Every answer must be < 500, every 4xx an OperationOutcome, every 200 a CDS
Hooks (or feedback) answer, and no log record may carry an exception.

The number of requests and the status histogram are printed in the run's figures section.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.app import create_app
from tests.figures import record_figure
from tests.service_fixtures import (
    EHR_FHIR,
    FHIR_TOKEN,
    PATIENT_ID,
    FakeRuntime,
    MockFhir,
    clinical_record,
    ecg_observation,
    hook_request,
    prediction,
    prefetch_from,
)

# Amplitudes beyond float32 (1e308 µV) overflow to inf on purpose; numpy says so with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

#: Generated requests per test; their sum is the per-run total the issue asks for (≥ 10 000).
EXAMPLES = {"hook": 3_200, "raw": 800, "prefetch": 3_000, "feedback": 3_000}
#: ``make soak`` runs every property again with this many times more examples.
SOAK_FACTOR = 5
SERVICES = ("ecglab-patient-view", "ecglab-order-select", "ecglab-order-sign")
HOOK_OF = {
    "ecglab-patient-view": "patient-view",
    "ecglab-order-select": "order-select",
    "ecglab-order-sign": "order-sign",
}


def fuzz_settings(kind: str, factor: int = 1) -> settings:
    """Hypothesis settings of one fuzz test: its example count, no deadline, no example database."""
    return settings(
        max_examples=EXAMPLES[kind] * factor,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# -- the service under fuzz, and the bookkeeping ---------------------------------------------------------------


@dataclass
class Tally:
    """Requests sent and answers seen, per status code, over the whole module."""

    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    by_test: collections.Counter[str] = field(default_factory=collections.Counter)


class ErrorCollector(logging.Handler):
    """Keeps every log record at ERROR or above, and every record that carries an exception."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Remember records that reveal an unhandled failure."""
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(record)


@dataclass
class Target:
    """The app under fuzz, its log collector and the tally."""

    app: Flask
    errors: ErrorCollector
    tally: Tally


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One app (auth off, FHIR fallback to an in-memory server holding the record) for the whole module."""
    folder = tmp_path_factory.mktemp("fuzz")
    record = clinical_record()
    app = create_app(
        {
            "auth": False,
            "issuers": "",
            "dev_fhir_servers": EHR_FHIR,
            "database_url": f"sqlite:///{folder / 'fuzz.sqlite3'}",
            "budget_ms": 5000,
        },
        runtime=FakeRuntime([prediction("ntprobnp", 0.95), prediction("potassium", 0.7, task="mon60")]),
    )
    state = app.extensions["ecglab"]
    state.pipeline.deps.fhir_transport = MockFhir([r for rs in record.values() for r in rs]).transport
    errors = ErrorCollector()
    root = logging.getLogger()
    root.addHandler(errors)
    tally = Tally()
    try:
        yield Target(app, errors, tally)
    finally:
        root.removeHandler(errors)
        state.close()
        if tally.requests:
            record_figure("fuzz: generated requests", tally.requests)
            for name, count in sorted(tally.by_test.items()):
                record_figure(f"fuzz: requests ({name})", count)
            histogram = ", ".join(f"{status}: {n}" for status, n in sorted(tally.statuses.items()))
            record_figure("fuzz: status histogram", histogram)


def check_answer(target: Target, response: Any, kind: str, *, generated: bool = True) -> None:
    """The rules every fuzzed answer obeys: < 500, OperationOutcome on errors, the right shape on 200."""
    if generated:
        target.tally.requests += 1
        target.tally.statuses[response.status_code] += 1
        target.tally.by_test[kind] += 1
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    body = response.get_json(silent=True)
    if response.status_code >= 400:
        assert response.mimetype == "application/fhir+json"
        assert isinstance(body, dict) and body.get("resourceType") == "OperationOutcome", body
        assert body["issue"] and all(i["severity"] == "error" for i in body["issue"])
    elif kind == "feedback":
        assert response.status_code == 200 and set(body) == {"received", "stored"}
    else:
        assert response.status_code == 200 and isinstance(body.get("cards"), list)
    if target.errors.bad:
        record = target.errors.bad[0]
        text = logging.Formatter().format(record)
        target.errors.bad.clear()
        pytest.fail(f"the service logged a failure: {text}")


# -- strategies ----------------------------------------------------------------------------------------------------

#: Strings that have broken parsers before: empty, control characters, lone surrogates, RTL marks,
#: path and query injection, broken URLs, extreme and invalid timestamps, FHIR SampledData markers.
WEIRD_STRINGS: list[str] = [
    "",
    " ",
    "\x00",
    "null",
    "../../etc/passwd",
    "Patient/../../admin",
    "pat-4711-secret?_format=xml&x=",
    "ümläüt-ÄÖ",
    "患者",
    "\U0001f600" * 10,
    "\u202eevil",
    "a" * 300,
    "1" * 70,
    "x" * 20_000,
    "http://[::1",
    "http://[::1]:99999/fhir",
    "http://user:pw@127.0.0.1/fhir",
    "https://",
    "javascript:alert(1)",
    "ftp://fhir.example.org/",
    "http://127.0.0.1:1/fhir",
    EHR_FHIR,
    EHR_FHIR + "/",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2026-02-30T10:00:00Z",
    "2026-01-01T10:00:00",
    "2026-01-01T10:00:00Z",
    "2026-01-01T10:00:00.123456789+05:30",
    "E",
    "1e400",
    "NaN",
]
WEIRD_STRINGS += [
    EHR_FHIR + "/\x00x",
    EHR_FHIR + "/患者",
    "tök-en",
    "a\nb",
    "\ud800",
    "a\udfffb",
    "\ufeffpatient-view",
    "patient-view\n",
    "\t",
    "\\",
    '"',
    "%00",
    "%2F..%2F",
]


def _random_text(rng: random.Random) -> str:
    """A string mixing ASCII, control, Latin-1, CJK, emoji and combining characters (any length to 64)."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0xFF), (0x4E00, 0x4E80), (0x1F600, 0x1F64F), (0x300, 0x36F)]
    chars = []
    for _ in range(rng.choice([0, 1, 3, 8, 20, 64])):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def _random_json(rng: random.Random, depth: int) -> Any:
    """A JSON value up to ``depth`` levels deep, leaves drawn from every JSON type."""
    kind = rng.randrange(9 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**70, 10**400, rng.randint(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e308, -1e-308, 3.5, 1e-9, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return rng.choice(WEIRD_STRINGS) if rng.random() < 0.4 else _random_text(rng)
    if kind in (6, 7):
        return {_random_text(rng)[:12]: _random_json(rng, depth - 1) for _ in range(rng.randrange(4))}
    return [_random_json(rng, depth - 1) for _ in range(rng.randrange(4))]


MISSING = object()  # a drawn "value" that deletes the field instead
_POOL_RNG = random.Random(20260101)
#: The values fields are replaced with: weird strings, random unicode, JSON of every type and shape,
#: and :data:`MISSING`. Drawing an index into a pool costs one Hypothesis choice instead of dozens,
#: which is what lets 10 000+ requests run in the fast suite; Hypothesis still decides which field
#: of which request gets which value, and one draw in eight is a fully generated JSON value
#: (:data:`RICH_JSON`), so the inputs are not limited to the pool.
VALUE_POOL: list[Any] = [
    *WEIRD_STRINGS,
    *[_random_text(_POOL_RNG) for _ in range(200)],
    *[_random_json(_POOL_RNG, 3) for _ in range(600)],
    MISSING,
    MISSING,
    MISSING,
]
RICH_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=12),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
OFFSETS = st.sampled_from(
    [UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=12)), timezone(timedelta(minutes=-30))]
)


# Strategies are built once: Hypothesis labels a sampled_from strategy by hashing all its elements,
# which costs more than the draw itself when it is rebuilt for every example.
POOL = st.sampled_from(VALUE_POOL)
ONE_IN_EIGHT = st.integers(0, 7)


@st.composite
def values(draw: st.DrawFn) -> Any:
    """A replacement value: from :data:`VALUE_POOL` seven times in eight, else generated by Hypothesis."""
    if draw(ONE_IN_EIGHT) == 0:
        return draw(RICH_JSON)
    return draw(POOL)


VALUES = values()


def whole_body(value: Any) -> Any:
    """A drawn value used as an entire request body (:data:`MISSING` becomes JSON ``null``)."""
    return None if value is MISSING else value


def set_path(value: Any, path: tuple[Any, ...], replacement: Any) -> Any:
    """A copy of ``value`` with the node at ``path`` set (created if absent; deleted for MISSING).

    A path that runs through a scalar or a too-short list replaces the node where it stops, so any
    path can be applied to any mutated document.
    """
    if not path:
        return replacement
    head, rest = path[0], path[1:]
    if isinstance(value, dict) and isinstance(head, str):
        copy = dict(value)
        new = set_path(copy.get(head), rest, replacement)
        if new is MISSING:
            copy.pop(head, None)
        else:
            copy[head] = new
        return copy
    if isinstance(value, list) and isinstance(head, int) and head < len(value):
        items = list(value)
        new = set_path(items[head], rest, replacement)
        if new is MISSING:
            del items[head]
        else:
            items[head] = new
        return items
    return replacement


@st.composite
def mutated(draw: st.DrawFn, base: Any, paths: st.SearchStrategy[tuple[Any, ...]], most: int = 3) -> Any:
    """``base`` with up to ``most`` paths (drawn from ``paths``) replaced by drawn values (or deleted)."""
    document = base
    for _ in range(draw(st.integers(0, most))):
        document = set_path(document, draw(paths), draw(VALUES))
    return document


def nested_text(depth: int) -> bytes:
    """JSON text nested ``depth`` levels deep in alternating objects and lists (built as text:
    ``json.dumps`` itself would hit the recursion limit)."""
    opening = "".join('{"resource": ' if level % 2 == 0 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 == 0 else "]" for level in reversed(range(depth)))
    return (opening + "1" + closing).encode()


#: The patient's record with a 3 s ECG (parsing 12 × 300 samples keeps each request fast).
SHORT_RECORD = clinical_record()
SHORT_RECORD["ecgObservations"] = [
    ecg_observation(recorded_at=datetime.now(UTC) - timedelta(minutes=10), seconds=3.0)
]
FULL_PREFETCH = prefetch_from(SHORT_RECORD)

#: Where hook requests get broken: every field the service reads, and some it must ignore.
HOOK_PATHS: list[tuple[Any, ...]] = [
    ("hook",),
    ("hookInstance",),
    ("context",),
    ("context", "patientId"),
    ("context", "patientId"),
    ("context", "userId"),
    ("context", "encounterId"),
    ("context", "draftOrders"),
    ("context", "draftOrders", "resourceType"),
    ("context", "draftOrders", "entry"),
    ("context", "draftOrders", "entry", 0),
    ("context", "draftOrders", "entry", 0, "resource"),
    ("context", "draftOrders", "entry", 0, "resource", "code"),
    ("context", "draftOrders", "entry", 0, "resource", "code", "coding", 0, "system"),
    ("context", "selections"),
    ("context", "vendorField"),
    ("fhirServer",),
    ("fhirServer",),
    ("fhirAuthorization",),
    ("fhirAuthorization", "access_token"),
    ("fhirAuthorization", "access_token"),
    ("fhirAuthorization", "expires_in"),
    ("prefetch",),
    ("prefetch", "patient"),
    ("prefetch", "vitals"),
    ("extension",),
    ("unknownTopLevel",),
]
HOOK_PATH = st.sampled_from(HOOK_PATHS)
PREFETCH_CHOICE = st.sampled_from([None, FULL_PREFETCH])
DRAFT_ORDER = {
    "resourceType": "ServiceRequest",
    "id": "draft-1",
    "status": "draft",
    "intent": "order",
    "code": {"coding": [{"system": "http://loinc.org", "code": "33762-6"}]},
    "subject": {"reference": f"Patient/{PATIENT_ID}"},
}


@st.composite
def hook_bodies(draw: st.DrawFn, service: str) -> Any:
    """A hook request for ``service``: a valid one (no, null or full prefetch) with fields broken, or any JSON."""
    if draw(st.integers(0, 19)) == 0:
        return whole_body(draw(VALUES))
    base = hook_request(
        HOOK_OF[service],
        fhir_server=EHR_FHIR,
        token=FHIR_TOKEN,
        draft_orders=[DRAFT_ORDER],
        prefetch=draw(PREFETCH_CHOICE),
    )
    return draw(mutated(base, HOOK_PATH))


RAW_BODIES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"1e999",
            b'{"hook": "patient-view", "hookInstance": ',
            b"\xff\xfe{\x00}",
            b'{"hook": "\xc3\x28"}',
            nested_text(50_000),
            nested_text(990),
            nested_text(400),
            nested_text(101),
            b'{"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p"}, "prefetch": {"patient": '
            + nested_text(900)
            + b"}}",
            b"[" * 200_000 + b"]" * 200_000,
            json.dumps({"hook": "patient-view", "hookInstance": "x" * 1_000_000, "context": {}}).encode(),
            b'{"feedback": [' + nested_text(900) + b"]}",
        ]
    ),
)

ECG_FIELD = st.sampled_from(["period", "factor", "dimensions", "origin", "data", "lowerLimit", "code"])
SAMPLED_DATA_VALUES: st.SearchStrategy[Any] = st.sampled_from(
    [0, -1, 1e-9, 1e9, 1e6, 1e308, 1e-300, 10**400, "10", "abc", None, True, [], {}, 2, 10, 1000, 2.5]
)
SAMPLE_STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "E E E",
            "1 2 NaN",
            "1e400 0",
            "1e308 " * 300,
            "0 " * 300,
            "E " * 100 + "0 " * 200,
            "1,2,3",
            "1" * 400,
        ]
    ),
    st.lists(st.sampled_from(["0", "1", "-1", "E", "L", "U", "1e38", "-1e38", "x"]), max_size=400).map(
        " ".join
    ),
)


ORIGIN_UNITS = st.sampled_from(["uV", "mV", "V", "mm[Hg]", 7])


@st.composite
def broken_ecg(draw: st.DrawFn) -> dict[str, Any]:
    """The short ECG Observation with one lead's SampledData field (or code) set to something odd."""
    observation = SHORT_RECORD["ecgObservations"][0]
    lead = draw(st.integers(0, len(observation["component"]) - 1))
    name = draw(ECG_FIELD)
    if name == "code":
        return set_path(observation, ("component", lead, "code", "coding", 0), draw(VALUES))
    value: Any
    if name == "data":
        value = draw(SAMPLE_STRINGS)
    elif name == "origin":
        value = draw(
            st.one_of(
                VALUES,
                st.fixed_dictionaries({"value": SAMPLED_DATA_VALUES, "code": ORIGIN_UNITS}),
            )
        )
    else:
        value = draw(st.one_of(SAMPLED_DATA_VALUES, VALUES))
    return set_path(observation, ("component", lead, "valueSampledData", name), value)


#: Where prefetched resources get broken (paths into the prefetch object of :data:`FULL_PREFETCH`).
PREFETCH_PATHS: list[tuple[Any, ...]] = [(key,) for key in FULL_PREFETCH] + [
    ("patient", "gender"),
    ("patient", "birthDate"),
    ("patient", "extension"),
    ("patient", "id"),
    ("vitals", "entry"),
    ("vitals", "entry", 0),
    ("vitals", "entry", 0, "resource"),
    ("vitals", "entry", 0, "resource", "status"),
    ("vitals", "entry", 0, "resource", "code"),
    ("vitals", "entry", 0, "resource", "code", "coding"),
    ("vitals", "entry", 0, "resource", "code", "coding", 0, "code"),
    ("vitals", "entry", 0, "resource", "code", "coding", 0, "system"),
    ("vitals", "entry", 0, "resource", "valueQuantity"),
    ("vitals", "entry", 0, "resource", "valueQuantity", "value"),
    ("vitals", "entry", 0, "resource", "valueQuantity", "code"),
    ("vitals", "entry", 0, "resource", "effectiveDateTime"),
    ("vitals", "entry", 0, "resource", "subject"),
    ("vitals", "entry", 0, "resource", "subject", "reference"),
    ("vitals", "entry", 1, "resource", "component"),
    ("vitals", "entry", 1, "resource", "dataAbsentReason"),
    ("ecgObservations", "entry", 0, "resource", "status"),
    ("ecgObservations", "entry", 0, "resource", "effectiveDateTime"),
    ("ecgObservations", "entry", 0, "resource", "code"),
    ("ecgObservations", "entry", 0, "resource", "component"),
    ("ecgObservations", "entry", 0, "resource", "component", 0),
    ("ecgObservations", "entry", 0, "resource", "subject"),
    ("ecgMedia", "entry"),
    ("ecgDocuments", "entry"),
    ("labs", "entry"),
    ("orders", "entry"),
    ("vendorKey",),
]
PREFETCH_PATH = st.sampled_from(PREFETCH_PATHS)
PREFETCH_VALUES = st.sampled_from(
    [
        None,
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "x"}]},
        {"resourceType": "OperationOutcome"},
        {"resourceType": "Bundle", "entry": "not a list"},
        {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "warning"}]}}],
        },
        {
            "resourceType": "Bundle",
            "entry": [None, 1, "x", {"resource": 3}, {"resource": {"resourceType": 7}}],
        },
        {"resourceType": "Medication", "id": "m"},
        {"resourceType": ["Bundle"]},
        [
            {
                "resourceType": "ServiceRequest",
                "status": ["active"],
                "code": {"coding": [{"system": 1, "code": "33762-6"}]},
            }
        ],
        {"resourceType": "Bundle", "entry": [{"resource": {**DRAFT_ORDER, "status": "active", "id": "o-1"}}]},
    ]
)


@st.composite
def prefetches(draw: st.DrawFn) -> Any:
    """:data:`FULL_PREFETCH` with keys and fields inside its resources replaced, dropped or nulled."""
    prefetch = FULL_PREFETCH
    if draw(st.booleans()):
        ecg = draw(broken_ecg())
        prefetch = set_path(prefetch, ("ecgObservations", "entry", 0, "resource"), ecg)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(PREFETCH_PATH)
        value = draw(st.one_of(VALUES, PREFETCH_VALUES)) if len(path) == 1 else draw(VALUES)
        prefetch = set_path(prefetch, path, value)
    return prefetch


VALID_ITEM = {
    "card": "0f9c7d0e-8a37-4e7b-b0a1-1d2e3f4a5b6c",
    "outcome": "overridden",
    "outcomeTimestamp": "2026-01-01T10:00:00Z",
    "overrideReason": {
        "reason": {"system": "urn:x", "code": "not-relevant", "display": "Not relevant"},
        "userComment": "n/a",
    },
}
ACCEPTED_ITEM = {
    "card": "1f9c7d0e-8a37-4e7b-b0a1-1d2e3f4a5b6c",
    "outcome": "accepted",
    "outcomeTimestamp": "2026-01-01T10:00:00+02:00",
    "acceptedSuggestions": [{"id": "2f9c7d0e-8a37-4e7b-b0a1-1d2e3f4a5b6c"}],
}
EPIC_ITEM = {
    "card": "3f9c7d0e",
    "outcome": "overridden",
    "outcomeTimestamp": "2026-01-01T10:00:00Z",
    "overrideReasons": [
        {
            "extension": {
                "com.epic.cdshooks.feedback.overrideReason.reasonCategory": "1",
                "x": [1, {"y": None}],
            }
        }
    ],
}
#: Where feedback items get broken (paths inside one item).
ITEM_PATHS: list[tuple[Any, ...]] = [
    ("card",),
    ("card",),
    ("outcome",),
    ("outcomeTimestamp",),
    ("outcomeTimestamp",),
    ("acceptedSuggestions",),
    ("acceptedSuggestions", 0),
    ("acceptedSuggestions", 0, "id"),
    ("overrideReason",),
    ("overrideReason", "reason"),
    ("overrideReason", "reason", "code"),
    ("overrideReason", "reason", "system"),
    ("overrideReason", "reason", "display"),
    ("overrideReason", "userComment"),
    ("overrideReasons",),
    ("overrideReasons", 0, "extension"),
    ("overrideReasons", 0, "extension", "com.epic.cdshooks.feedback.overrideReason.reasonCategory"),
    ("overrideReasons", 0, "extension", "com.epic.cdshooks.feedback.overrideReason.reasonDisplay"),
    ("extension",),
]


ITEM_PATH = st.sampled_from(ITEM_PATHS)
ITEM_TEMPLATE: st.SearchStrategy[dict[str, Any]] = st.sampled_from([VALID_ITEM, ACCEPTED_ITEM, EPIC_ITEM])
BATCH_SIZES = st.sampled_from([0, 500, 501])
BODY_PATH = st.sampled_from([("feedback",), ("vendorKey",)])


@st.composite
def feedback_items(draw: st.DrawFn) -> Any:
    """One feedback item: a spec, accepted or Epic item with a fresh card uuid, then fields broken."""
    item = {**draw(ITEM_TEMPLATE), "card": str(uuid.uuid4())}
    if draw(st.integers(0, 4)) == 0:
        stamp = draw(st.datetimes(timezones=OFFSETS))
        item["outcomeTimestamp"] = stamp.isoformat()
    return draw(mutated(item, ITEM_PATH, most=2))


ITEM_LISTS = st.lists(feedback_items(), min_size=1, max_size=3)


@st.composite
def feedback_bodies(draw: st.DrawFn) -> Any:
    """A feedback request body: a list of (mostly) items, or any JSON at all."""
    choice = draw(st.integers(0, 19))
    if choice == 0:
        return whole_body(draw(VALUES))
    if choice == 1:
        return {"feedback": [VALID_ITEM] * draw(BATCH_SIZES)}
    body: dict[str, Any] = {"feedback": draw(ITEM_LISTS)}
    return draw(mutated(body, BODY_PATH, most=1)) if choice == 2 else body


# -- the properties -------------------------------------------------------------------------------------------


def post_hook(target: Target, service: str, body: Any) -> None:
    """POST a hook body to ``service`` and check the answer."""
    check_answer(target, target.app.test_client().post(f"/cds-services/{service}", json=body), "hook")


def post_raw(target: Target, endpoint: str, raw: bytes, content_type: str) -> None:
    """POST raw bytes to ``endpoint`` and check the answer."""
    response = target.app.test_client().post(endpoint, data=raw, content_type=content_type or None)
    check_answer(target, response, "feedback" if endpoint.endswith("/feedback") else "hook")


def post_prefetch(target: Target, service: str, prefetch: Any, with_server: bool) -> None:
    """POST a valid hook request carrying ``prefetch`` (and a FHIR server when ``with_server``)."""
    body = hook_request(
        HOOK_OF[service],
        prefetch=prefetch,
        fhir_server=EHR_FHIR if with_server else None,
        token=FHIR_TOKEN if with_server else None,
    )
    response = target.app.test_client().post(f"/cds-services/{service}", json=body)
    check_answer(target, response, "prefetch")
    if with_server:
        assert response.status_code != 412, "every missing key can be fetched from the FHIR server"


def post_feedback(target: Target, service: str, body: Any) -> None:
    """POST a feedback body to ``service`` and check the answer."""
    response = target.app.test_client().post(f"/cds-services/{service}/feedback", json=body)
    check_answer(target, response, "feedback")


SERVICE_IDS = st.sampled_from([*SERVICES * 6, "unknown-service", "ecglab-patient-view%00", "x" * 300])
RAW_ENDPOINTS = st.sampled_from(
    ["/cds-services/ecglab-order-sign", "/cds-services/ecglab-patient-view/feedback"]
)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/plain", "application/fhir+json; charset=latin-1", ""]
)


@st.composite
def hook_calls(draw: st.DrawFn) -> tuple[str, Any]:
    """A service id (sometimes unknown) and a hook body for it."""
    service = draw(SERVICE_IDS)
    return service, draw(hook_bodies(service if service in SERVICES else SERVICES[0]))


@fuzz_settings("hook")
@given(call=hook_calls())
def test_fuzzed_hook_requests_never_fail_the_service(target: Target, call: tuple[str, Any]) -> None:
    """§7: any hook body (valid-shaped, broken, foreign) → 200/400/404/412 with an OperationOutcome, never 5xx."""
    post_hook(target, *call)


@fuzz_settings("raw")
@given(raw=RAW_BODIES, endpoint=RAW_ENDPOINTS, content_type=CONTENT_TYPES)
def test_raw_bodies_that_are_not_json_are_refused_cleanly(
    target: Target, raw: bytes, endpoint: str, content_type: str
) -> None:
    """§7 "malformed body": bytes that are no JSON, are truncated, or nest 200 000 deep → 400, never 5xx."""
    post_raw(target, endpoint, raw, content_type)


@fuzz_settings("prefetch")
@given(prefetch=prefetches(), service=st.sampled_from(SERVICES), with_server=st.booleans())
def test_fuzzed_prefetch_contents_never_fail_the_service(
    target: Target, prefetch: Any, service: str, with_server: bool
) -> None:
    """§4 prefetch-state table: null, OperationOutcome, foreign and broken resources → cards, no cards or 412."""
    post_prefetch(target, service, prefetch, with_server)


@fuzz_settings("feedback")
@given(body=feedback_bodies(), service=st.sampled_from(SERVICES))
def test_fuzzed_feedback_bodies_never_fail_the_service(target: Target, body: Any, service: str) -> None:
    """§6 + §0.7: feedback in spec, Epic and broken shapes → 200 or a 400 naming the field, never 5xx."""
    post_feedback(target, service, body)


def test_fuzz_volume_meets_the_issue(target: Target, request: pytest.FixtureRequest) -> None:
    """The issue: at least 10 000 generated requests per run across the fuzz tests (checked when all ran)."""
    fuzz_tests = {
        "test_fuzzed_hook_requests_never_fail_the_service",
        "test_raw_bodies_that_are_not_json_are_refused_cleanly",
        "test_fuzzed_prefetch_contents_never_fail_the_service",
        "test_fuzzed_feedback_bodies_never_fail_the_service",
    }
    selected = {
        item.originalname
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.module is request.module
    }
    if not fuzz_tests <= selected:
        pytest.skip("only part of the fuzz module was selected")
    assert target.tally.requests >= 10_000, target.tally


# -- the same properties, five times longer (make soak) ---------------------------------------------------


@pytest.mark.soak
@fuzz_settings("hook", SOAK_FACTOR)
@given(call=hook_calls())
def test_soak_fuzzed_hook_requests(target: Target, call: tuple[str, Any]) -> None:
    """Soak: :func:`test_fuzzed_hook_requests_never_fail_the_service` with five times the examples."""
    post_hook(target, *call)


@pytest.mark.soak
@fuzz_settings("raw", SOAK_FACTOR)
@given(raw=RAW_BODIES, endpoint=RAW_ENDPOINTS, content_type=CONTENT_TYPES)
def test_soak_raw_bodies(target: Target, raw: bytes, endpoint: str, content_type: str) -> None:
    """Soak: :func:`test_raw_bodies_that_are_not_json_are_refused_cleanly` with five times the examples."""
    post_raw(target, endpoint, raw, content_type)


@pytest.mark.soak
@fuzz_settings("prefetch", SOAK_FACTOR)
@given(prefetch=prefetches(), service=st.sampled_from(SERVICES), with_server=st.booleans())
def test_soak_fuzzed_prefetch_contents(
    target: Target, prefetch: Any, service: str, with_server: bool
) -> None:
    """Soak: :func:`test_fuzzed_prefetch_contents_never_fail_the_service` with five times the examples."""
    post_prefetch(target, service, prefetch, with_server)


@pytest.mark.soak
@fuzz_settings("feedback", SOAK_FACTOR)
@given(body=feedback_bodies(), service=st.sampled_from(SERVICES))
def test_soak_fuzzed_feedback_bodies(target: Target, body: Any, service: str) -> None:
    """Soak: :func:`test_fuzzed_feedback_bodies_never_fail_the_service` with five times the examples."""
    post_feedback(target, service, body)


# -- inputs that failed the service before it was fixed (pinned, so they never come back) ----------------------


def with_prefetch_change(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A patient-view request whose full prefetch has ``value`` at ``path``."""
    return hook_request("patient-view", prefetch=set_path(FULL_PREFETCH, path, value))


ECG_COMPONENT = ("ecgObservations", "entry", 0, "resource", "component", 0, "valueSampledData")
REGRESSIONS: dict[str, tuple[str, Any, int]] = {
    "JSON nested 50 000 deep (RecursionError in the parser)": ("hook", nested_text(50_000), 400),
    "feedback nested 50 000 deep": ("feedback", nested_text(50_000), 400),
    "fhirServer with an unclosed IPv6 bracket": (
        "hook",
        hook_request("patient-view", fhir_server="http://[::1", token=FHIR_TOKEN),
        400,
    ),
    "fhirServer with a port out of range": (
        "hook",
        hook_request("patient-view", fhir_server="http://127.0.0.1:99999/fhir", token=FHIR_TOKEN),
        400,
    ),
    "fhirServer with a NUL character": (
        "hook",
        hook_request("patient-view", fhir_server=EHR_FHIR + "/\x00x", token=FHIR_TOKEN),
        400,
    ),
    "access token that is not ASCII": (
        "hook",
        hook_request("patient-view", fhir_server=EHR_FHIR, token="tök-en"),
        412,
    ),
    "Coding list that is a number": (
        "hook",
        with_prefetch_change(("vitals", "entry", 0, "resource", "code", "coding"), 5),
        200,
    ),
    "resource status that is a list": (
        "hook",
        with_prefetch_change(("vitals", "entry", 0, "resource", "status"), ["final"]),
        200,
    ),
    "quantity of 400 digits": (
        "hook",
        with_prefetch_change(("vitals", "entry", 0, "resource", "valueQuantity", "value"), 10**400),
        200,
    ),
    "time with no UTC equivalent": (
        "hook",
        with_prefetch_change(
            ("vitals", "entry", 0, "resource", "effectiveDateTime"), "0001-01-01T00:00:00+01:00"
        ),
        200,
    ),
    "SampledData dimensions that is text": (
        "hook",
        with_prefetch_change((*ECG_COMPONENT, "dimensions"), "abc"),
        200,
    ),
    "SampledData origin that is text": ("hook", with_prefetch_change((*ECG_COMPONENT, "origin"), "x"), 200),
    "SampledData origin unit that is a number": (
        "hook",
        with_prefetch_change((*ECG_COMPONENT, "origin"), {"value": 0, "code": 7}),
        200,
    ),
    "SampledData period of 400 digits": (
        "hook",
        with_prefetch_change((*ECG_COMPONENT, "period"), 10**400),
        200,
    ),
    "order status that is a list": (
        "hook",
        with_prefetch_change(
            ("orders",),
            {"resourceType": "Bundle", "entry": [{"resource": {**DRAFT_ORDER, "status": ["active"]}}]},
        ),
        200,
    ),
    "order code system that is a number": (
        "hook",
        with_prefetch_change(
            ("orders",),
            {
                "resourceType": "Bundle",
                "entry": [
                    {
                        "resource": {
                            **DRAFT_ORDER,
                            "status": "active",
                            "code": {"coding": [{"system": 1, "code": "33762-6"}]},
                        }
                    }
                ],
            },
        ),
        200,
    ),
    "hookInstance that is not valid Unicode (stored with issued cards)": (
        "hook",
        {**hook_request("patient-view", prefetch=FULL_PREFETCH), "hookInstance": "\ud800"},
        400,
    ),
    "feedback timestamp with no UTC equivalent": (
        "feedback",
        {"feedback": [{**VALID_ITEM, "outcomeTimestamp": "0001-01-01T00:00:00+01:00"}]},
        400,
    ),
    "feedback card that is not valid Unicode": (
        "feedback",
        {"feedback": [{**VALID_ITEM, "card": "\ud800"}]},
        400,
    ),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_inputs_that_once_failed_the_service_are_answered_cleanly(target: Target, case: str) -> None:
    """§7: each input the fuzzers found failing (a 500 or a logged traceback) now gets its defined answer."""
    endpoint, body, status = REGRESSIONS[case]
    path = "/cds-services/ecglab-patient-view" + ("/feedback" if endpoint == "feedback" else "")
    client = target.app.test_client()
    response = (
        client.post(path, data=body, content_type="application/json")
        if isinstance(body, bytes)
        else client.post(path, json=body)
    )
    check_answer(target, response, endpoint, generated=False)
    assert response.status_code == status, response.get_json()
