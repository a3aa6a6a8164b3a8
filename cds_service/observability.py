"""Logging and Prometheus metrics for the service.

Logging rules (cdshooks.md §0.8, BP): never log the inbound JWT, ``fhirAuthorization`` tokens or
patient identifiers; log ``hookInstance``, ``iss``, ``tenant`` and ``jti`` instead. The code
follows that rule at every call site; :class:`RedactingFilter` is a second line of defence that
masks anything shaped like a JWT or a bearer credential before a record is written, in case a
library (or a future edit) puts one into a message.

:func:`configure_logging` is called once per process by ``ecglab serve`` (never by
``create_app``, so that embedding applications and pytest's log capture keep their handlers).
Each record carries the current request's service id and ``hookInstance`` from a context
variable that the request handlers set (:func:`bind_request`).

Metrics live in the default ``prometheus_client`` registry. Under gunicorn with several workers,
``ecglab serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before this module is
imported; :func:`render_metrics` then aggregates every worker's samples, so ``/metrics`` gives
the same answer whichever worker serves it.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

_request_context: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "ecglab_request_context", default=("-", "-")
)

_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_ACCESS_TOKEN_RE = re.compile(r"(?i)(\"?access_token\"?\s*[:=]\s*\"?)[^\s\",}]{4,}")
_URL_RE = re.compile(r"(?i)\b(https?://[^/\s\"'<>?#]+)([/?#][^\s\"'<>]*)")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

REQUESTS = Counter(
    "ecglab_requests",
    "HTTP requests answered, by endpoint kind, CDS service id and status",
    ["endpoint", "service", "status"],
)
REQUEST_SECONDS = Histogram(
    "ecglab_request_seconds", "Wall time of HTTP requests", ["endpoint", "service"], buckets=LATENCY_BUCKETS
)
INFERENCE_SECONDS = Histogram(
    "ecglab_inference_seconds", "Model inference time per hook call", buckets=LATENCY_BUCKETS
)
FHIR_SECONDS = Histogram(
    "ecglab_fhir_seconds", "Time spent fetching FHIR data the prefetch lacked", buckets=LATENCY_BUCKETS
)
CARDS = Counter("ecglab_cards", "Cards emitted, by service and lab", ["service", "lab"])
HOOK_OUTCOMES = Counter(
    "ecglab_hook_outcomes",
    "Hook calls by outcome (cards, no_cards, no_ecg, ecg_rejected, budget_exceeded, precondition_failed, error)",
    ["service", "outcome"],
)
FEEDBACK_ITEMS = Counter("ecglab_feedback_items", "Feedback items received, by outcome", ["outcome"])


def bind_request(service: str, hook_instance: str) -> contextvars.Token[tuple[str, str]]:
    """Attach the service id and ``hookInstance`` to every log record of the current context."""
    return _request_context.set((_clean(service), _clean(hook_instance)))


def reset_request(token: contextvars.Token[tuple[str, str]]) -> None:
    """Undo :func:`bind_request`."""
    _request_context.reset(token)


@contextmanager
def request_context(service: str, hook_instance: str) -> Iterator[None]:
    """Context manager form of :func:`bind_request`."""
    token = bind_request(service, hook_instance)
    try:
        yield
    finally:
        reset_request(token)


def _clean(value: str) -> str:
    """A log-safe rendering of a caller-supplied string: printable, bounded, no newlines."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return text[:120]


def log_safe(value: object) -> str:
    """Caller-supplied text (iss, jti, reasons) made safe for one log line."""
    return _clean(str(value)) if value is not None else "-"


def redact(text: str) -> str:
    """Mask JWTs, bearer credentials and ``access_token`` values in ``text``."""
    text = _JWT_RE.sub("[redacted-jwt]", text)
    text = _BEARER_RE.sub(r"\1[redacted]", text)
    return _ACCESS_TOKEN_RE.sub(r"\1[redacted]", text)


class UrlRedactingFilter(logging.Filter):
    """Cuts every URL in a record's message down to its origin: paths and queries name patients.

    httpx logs each request line (``HTTP Request: GET https://fhir/Patient/<id>?subject=...``) at
    INFO. The service keeps that logger at WARNING, but an operator's logging configuration (or a
    test running every logger at DEBUG) may turn it on; this filter sits on the ``httpx`` logger
    itself, so whatever handler receives the record gets ``https://fhir.example.org/...`` only.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace path, query and fragment of each URL in the message with ``/...``."""
        message = record.getMessage()
        cleaned = _URL_RE.sub(r"\1/...", message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def protect_library_loggers() -> None:
    """Put :class:`UrlRedactingFilter` on the ``httpx`` logger (once; repeated calls change nothing)."""
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, UrlRedactingFilter) for f in logger.filters):
        logger.addFilter(UrlRedactingFilter())


class ContextFilter(logging.Filter):
    """Adds ``service`` and ``hook_instance`` attributes (from :func:`bind_request`) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the request context to the record."""
        record.service, record.hook_instance = _request_context.get()
        return True


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with :func:`redact` applied (defence in depth)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask credentials in the record's message and traceback."""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def configure_logging(level: str) -> None:
    """Process-wide logging: one stderr handler with context and redaction filters."""
    protect_library_loggers()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "context": {"()": ContextFilter},
                "redact": {"()": RedactingFilter},
            },
            "formatters": {
                "plain": {
                    "format": "%(asctime)s %(levelname)s %(name)s [%(service)s %(hook_instance)s] %(message)s",
                }
            },
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "stream": "ext://sys.stderr",
                    "formatter": "plain",
                    "filters": ["context", "redact"],
                }
            },
            "root": {"level": level, "handlers": ["stderr"]},
            "loggers": {
                "httpx": {"level": "WARNING"},
                "httpcore": {"level": "WARNING"},
                "werkzeug": {"level": "WARNING"},
            },
        }
    )


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus exposition of every metric (all workers' when multiprocess mode is on)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Tell the multiprocess collector that a gunicorn worker exited (its live gauges go away)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        prom_multiprocess.mark_process_dead(pid)
