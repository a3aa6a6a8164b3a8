"""Parsers of the service's settings: each turns one raw environment string into a checked value.

:mod:`cds_service.settings` declares every setting with one of these parsers; a parser raises
:class:`fhir_mappings.errors.ConfigError` naming the variable, so a malformed value stops start-up
with one clear line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fhir_mappings.errors import ConfigError

SEVERITIES = ("info", "warning", "critical")
INDICATORS = ("info", "warning", "critical")

#: Default card indicator rules: a lab's severity (from fhir_mappings) and the model probability
#: pick the indicator; the first matching rule wins. Lab recommendations stay ``info``/``warning``
#: by default (cdshooks.md §0.6): ``critical`` makes Cerner pop up a modal, which a model estimate
#: does not justify unless a site opts in.
DEFAULT_INDICATOR_MAP = "critical>=0.8:warning;warning>=0.9:warning;*>=0:info"

Parser = Callable[[str, str], Any]


@dataclass(frozen=True)
class IndicatorRule:
    """One rule of ``ECGLAB_INDICATOR_MAP``: labs of ``severity`` (or ``*``) with probability ≥ ``min_probability``."""

    severity: str
    min_probability: float
    indicator: str

    def matches(self, severity: str, probability: float) -> bool:
        """Whether this rule applies to a lab of ``severity`` predicted with ``probability``."""
        return self.severity in ("*", severity) and probability >= self.min_probability


# -- parsers: (raw string, name of the variable) -> value; raise ConfigError naming the variable ----


def parse_str(raw: str, name: str) -> str:
    """Any string, surrounding blanks removed."""
    return raw.strip()


def parse_nonempty(raw: str, name: str) -> str:
    """A non-empty string."""
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name}: must not be empty")
    return value


def parse_choice(raw: str, name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (case-insensitive)."""
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
    return value


def parse_bool(raw: str, name: str) -> bool:
    """on/off (also 1/0, true/false, yes/no)."""
    value = raw.strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"{name}: expected on/off, got {raw!r}")


def int_parser(minimum: int, maximum: int) -> Parser:
    """A parser for integers within ``minimum``..``maximum``."""

    def parse(raw: str, name: str) -> int:
        """Parse and range-check one integer."""
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"{name}: {value} is outside {minimum}..{maximum}")
        return value

    return parse


def float_parser(minimum: float, maximum: float) -> Parser:
    """A parser for numbers within ``minimum``..``maximum``."""

    def parse(raw: str, name: str) -> float:
        """Parse and range-check one number."""
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"{name}: {value} is outside {minimum}..{maximum}")
        return value

    return parse


def parse_http_url(raw: str, name: str) -> str:
    """An http(s) URL without query, fragment or credentials; trailing slash removed."""
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an http(s) URL, got {raw!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{name}: the URL must not carry a query, fragment or credentials")
    return value


def parse_optional_url(raw: str, name: str) -> str:
    """An http(s) URL, or empty."""
    return parse_http_url(raw, name) if raw.strip() else ""


def parse_optional_path(raw: str, name: str) -> Path | None:
    """A path, or ``None`` when empty."""
    value = raw.strip()
    return Path(value).expanduser() if value else None


def parse_path(raw: str, name: str) -> Path:
    """A non-empty path (``~`` expanded)."""
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name}: must name a path")
    return Path(value).expanduser()


def parse_url_list(raw: str, name: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs."""
    items = [item.strip() for item in raw.split(",") if item.strip()]
    for item in items:
        parse_http_url(item, name)
    return tuple(items)


def parse_str_list(raw: str, name: str) -> tuple[str, ...]:
    """Comma-separated strings, blanks dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_cors(raw: str, name: str) -> tuple[str, ...]:
    """Comma-separated origins (scheme://host[:port]) or ``*``; empty means none (no CORS)."""
    items = parse_str_list(raw, name)
    for item in items:
        if item != "*":
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(f"{name}: {item!r} is not an origin like https://ehr.example.org")
    return tuple(item.rstrip("/") for item in items)


def parse_log_level(raw: str, name: str) -> str:
    """A logging level name."""
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{name}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    return value


def parse_intent(raw: str, name: str) -> str:
    """A ServiceRequest intent suitable for a suggested order."""
    value = raw.strip()
    if value not in ("proposal", "plan", "order"):
        raise ConfigError(f"{name}: expected proposal, plan or order, got {raw!r}")
    return value


def parse_database_url(raw: str, name: str) -> str:
    """A SQLite or PostgreSQL SQLAlchemy URL."""
    value = raw.strip()
    if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgresql+psycopg2:")):
        raise ConfigError(f"{name}: expected a sqlite:/// or postgresql+psycopg:// URL")
    return value


def parse_indicator_map(raw: str, name: str = "ECGLAB_INDICATOR_MAP") -> tuple[IndicatorRule, ...]:
    """Parse ``severity>=probability:indicator`` rules separated by ``;`` (first match wins).

    ``severity`` is ``info``, ``warning``, ``critical`` or ``*``; the last rule should be a
    ``*>=0:...`` catch-all, which this parser requires so that every card gets an indicator.
    """
    rules: list[IndicatorRule] = []
    for chunk in (c.strip() for c in raw.split(";")):
        if not chunk:
            continue
        try:
            condition, indicator = chunk.rsplit(":", 1)
            severity, threshold = condition.split(">=", 1)
            probability = float(threshold)
        except ValueError:
            raise ConfigError(f"{name}: rule {chunk!r} is not 'severity>=probability:indicator'") from None
        severity, indicator = severity.strip(), indicator.strip()
        if severity != "*" and severity not in SEVERITIES:
            raise ConfigError(f"{name}: rule {chunk!r}: severity must be one of {SEVERITIES} or '*'")
        if indicator not in INDICATORS:
            raise ConfigError(f"{name}: rule {chunk!r}: indicator must be one of {INDICATORS}")
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"{name}: rule {chunk!r}: probability must lie in 0..1")
        rules.append(IndicatorRule(severity, probability, indicator))
    if not any(r.severity == "*" and r.min_probability == 0.0 for r in rules):
        raise ConfigError(f"{name}: add a catch-all rule such as '*>=0:info'")
    return tuple(rules)
