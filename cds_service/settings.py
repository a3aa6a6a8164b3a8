"""Every setting of the CDS Hooks service: one default, one environment variable, one parser.

The service is configured only through this module. Each field of :class:`Settings` carries its
environment variable, its help text and a parser that validates the raw string; ``ecglab serve
--help`` lists them all from the same table (:func:`describe_settings`), so the documentation can
never drift from the code.

Two ways in:

* :meth:`Settings.from_env` reads ``ECGLAB_*`` variables (production, ``ecglab serve``);
* :meth:`Settings.from_mapping` takes a dict keyed by field name or environment variable (tests,
  embedding). It does not consult the environment, so tests stay hermetic.

A malformed value raises :class:`fhir_mappings.errors.ConfigError` naming the variable (or mapping
key), so the service stops at startup with one clear line instead of failing on the first request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds_service.setting_parsers import (
    DEFAULT_INDICATOR_MAP,
    IndicatorRule,
    Parser,
    float_parser,
    int_parser,
    parse_bool,
    parse_choice,
    parse_cors,
    parse_database_url,
    parse_http_url,
    parse_indicator_map,
    parse_intent,
    parse_log_level,
    parse_nonempty,
    parse_optional_path,
    parse_optional_url,
    parse_path,
    parse_str,
    parse_str_list,
    parse_url_list,
)
from fhir_mappings.errors import ConfigError


def default_model_dir() -> Path:
    """The repository's bundled ``models/`` folder, resolved relative to this package."""
    return Path(__file__).resolve().parents[1] / "models"


def _meta(env: str, parser: Parser, help: str) -> dict[str, Any]:
    """Field metadata: the setting's environment variable, its parser and its help text."""
    return {"env": env, "parser": parser, "help": help}


@dataclass(frozen=True)
class Settings:
    """The validated configuration; build it with :meth:`from_env` or :meth:`from_mapping`."""

    public_url: str = field(
        default="http://127.0.0.1:8080",
        metadata=_meta(
            "ECGLAB_PUBLIC_URL",
            parse_http_url,
            "externally visible base URL (before /cds-services); JWT 'aud' must be it + the endpoint path",
        ),
    )
    auth: bool = field(
        default=True,
        metadata=_meta(
            "ECGLAB_AUTH", parse_bool, "verify the EHR's JWT on every call (off = development only)"
        ),
    )
    issuers: Path | None = field(
        default=None,
        metadata=_meta(
            "ECGLAB_ISSUERS",
            parse_optional_path,
            "YAML file of allowed JWT issuers (required when auth is on)",
        ),
    )
    dev_fhir_servers: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "ECGLAB_DEV_FHIR_SERVERS",
            parse_url_list,
            "with auth off: comma-separated fhirServer URL prefixes the service may call (empty = loopback only)",
        ),
    )
    demo: bool = field(
        default=False,
        metadata=_meta(
            "ECGLAB_DEMO",
            parse_bool,
            "serve the /demo card-preview page for the first ECGLAB_DEV_FHIR_SERVERS entry (needs ECGLAB_AUTH=off)",
        ),
    )
    model_dir: Path = field(
        default=default_model_dir(),
        metadata=_meta(
            "ECGLAB_MODEL_DIR", parse_path, "folder with the exported model (newest *.manifest.json)"
        ),
    )
    onnx_providers: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "ECGLAB_ONNX_PROVIDERS",
            parse_str_list,
            "ONNX Runtime providers in order (empty = CUDA if usable, then CPU)",
        ),
    )
    model_variant: str = field(
        default="auto",
        metadata=_meta(
            "ECGLAB_MODEL_VARIANT",
            lambda raw, name: parse_choice(raw, name, ("auto", "fp32", "int8")),
            "model graph to serve: fp32, int8 (from 'ecglab quantize') or auto = the fastest variant "
            "within its accuracy bounds on the CPU provider, else fp32",
        ),
    )
    batch_max_wait_ms: int = field(
        default=5,
        metadata=_meta(
            "ECGLAB_BATCH_MAX_WAIT_MS",
            int_parser(0, 100),
            "batch concurrent calls of a worker into one model call, waiting at most this long "
            "(only under concurrency; 0 = off)",
        ),
    )
    database_url: str = field(
        default="sqlite:///ecglab-service.sqlite3",
        metadata=_meta(
            "ECGLAB_DATABASE_URL",
            parse_database_url,
            "SQLAlchemy URL for feedback, issued cards and the JWT replay cache (sqlite file or postgresql+psycopg)",
        ),
    )
    budget_ms: int = field(
        default=1500,
        metadata=_meta(
            "ECGLAB_BUDGET_MS", int_parser(50, 60_000), "hard time budget per hook call; beyond it: no cards"
        ),
    )
    fhir_timeout_ms: int = field(
        default=1000,
        metadata=_meta(
            "ECGLAB_FHIR_TIMEOUT_MS",
            int_parser(10, 60_000),
            "timeout of one FHIR request (capped by the budget)",
        ),
    )
    ecg_decode_processes: int = field(
        default=2,
        metadata=_meta(
            "ECGLAB_ECG_DECODE_PROCESSES",
            int_parser(0, 32),
            "worker processes per server process that decode ECG files, abandoned at the budget (0: decode in-process)",
        ),
    )
    prediction_cache_s: int = field(
        default=600,
        metadata=_meta(
            "ECGLAB_PREDICTION_CACHE_S",
            int_parser(0, 86_400),
            "reuse a hook call's predictions this many seconds for calls with identical inputs (an order "
            "hook after patient-view on the same ECG: no decoding, no inference), shared through the "
            "database (0 = off)",
        ),
    )
    host: str = field(
        default="127.0.0.1", metadata=_meta("ECGLAB_HOST", parse_nonempty, "address gunicorn binds to")
    )
    port: int = field(
        default=8080, metadata=_meta("ECGLAB_PORT", int_parser(1, 65_535), "port gunicorn binds to")
    )
    workers: int = field(
        default=2, metadata=_meta("ECGLAB_WORKERS", int_parser(1, 64), "gunicorn worker processes")
    )
    threads: int = field(
        default=4, metadata=_meta("ECGLAB_THREADS", int_parser(1, 64), "threads per gunicorn worker")
    )
    worker_timeout_s: int = field(
        default=30,
        metadata=_meta(
            "ECGLAB_WORKER_TIMEOUT_S", int_parser(5, 3600), "gunicorn kills a worker silent for this long"
        ),
    )
    max_body_mb: int = field(
        default=32,
        metadata=_meta(
            "ECGLAB_MAX_BODY_MB",
            int_parser(1, 512),
            "largest accepted request body (prefetch may carry ECG files)",
        ),
    )
    max_cards: int = field(
        default=5,
        metadata=_meta("ECGLAB_MAX_CARDS", int_parser(1, 50), "most cards per response, most urgent first"),
    )
    min_auroc: float = field(
        default=0.70,
        metadata=_meta(
            "ECGLAB_MIN_AUROC",
            float_parser(0.0, 1.0),
            "a target gives cards only if its validation-fold AUROC's 95% CI lower bound (manifest) exceeds this; 0 = all",
        ),
    )
    recent_result_min: int = field(
        default=360,
        metadata=_meta(
            "ECGLAB_RECENT_RESULT_MIN",
            int_parser(0, 525_600),
            "no card for a lab resulted within this many minutes",
        ),
    )
    fail_quiet: bool = field(
        default=False,
        metadata=_meta(
            "ECGLAB_FAIL_QUIET",
            parse_bool,
            "on: answer 200 with no cards (and log) instead of 500 on internal errors",
        ),
    )
    indicator_map: tuple[IndicatorRule, ...] = field(
        default=parse_indicator_map(DEFAULT_INDICATOR_MAP),
        metadata=_meta(
            "ECGLAB_INDICATOR_MAP",
            parse_indicator_map,
            "card indicator by lab severity and probability: 'severity>=p:indicator;...', first match wins",
        ),
    )
    order_intent: str = field(
        default="proposal",
        metadata=_meta(
            "ECGLAB_ORDER_INTENT", parse_intent, "intent of the draft ServiceRequest a card suggests"
        ),
    )
    source_label: str = field(
        default="ecglab ECG lab model",
        metadata=_meta("ECGLAB_SOURCE_LABEL", parse_nonempty, "card source.label shown to clinicians"),
    )
    source_url: str = field(
        default="",
        metadata=_meta(
            "ECGLAB_SOURCE_URL",
            parse_optional_url,
            "card source.url, e.g. the model card page (empty = omitted)",
        ),
    )
    topic_system: str = field(
        default="urn:ecglab:cds-topic",
        metadata=_meta("ECGLAB_TOPIC_SYSTEM", parse_nonempty, "code system of card source.topic codes"),
    )
    override_reason_system: str = field(
        default="urn:ecglab:override-reason",
        metadata=_meta(
            "ECGLAB_OVERRIDE_REASON_SYSTEM",
            parse_nonempty,
            "code system of the override reasons offered on cards",
        ),
    )
    record_cards: bool = field(
        default=True,
        metadata=_meta(
            "ECGLAB_RECORD_CARDS",
            parse_bool,
            "store each issued card (uuid, lab, probability) for feedback analysis",
        ),
    )
    mode: str = field(
        default="live",
        metadata=_meta(
            "ECGLAB_MODE",
            lambda raw, name: parse_choice(raw, name, ("live", "shadow")),
            "live: cards reach the EHR; shadow: the model runs and is audited, the EHR gets no cards "
            "(the stricter of this and the ECGLAB_CONTROLS mode applies)",
        ),
    )
    controls: Path | None = field(
        default=None,
        metadata=_meta(
            "ECGLAB_CONTROLS",
            parse_optional_path,
            "kill-switch YAML (mode live|shadow|off, disabled_labs, disabled_targets), re-read when it changes",
        ),
    )
    audit: bool = field(
        default=True,
        metadata=_meta("ECGLAB_AUDIT", parse_bool, "write one audit row per hook call (table hook_audit)"),
    )
    audit_key: str = field(
        default="",
        repr=False,
        metadata=_meta(
            "ECGLAB_AUDIT_KEY",
            parse_str,
            "secret (32+ bytes) keying the audit's patient hash; required with auth and audit on "
            "(auth off: a random key per process, with a warning)",
        ),
    )
    audit_retention_days: int = field(
        default=0,
        metadata=_meta(
            "ECGLAB_AUDIT_RETENTION_DAYS",
            int_parser(0, 36_500),
            "delete audit rows older than this many days, at start-up and daily (0 = keep all)",
        ),
    )
    site_info: Path | None = field(
        default=None,
        metadata=_meta(
            "ECGLAB_SITE_INFO",
            parse_optional_path,
            "site YAML of the model card: contact, local validation, update schedule (empty = none stated)",
        ),
    )
    monitor_dir: Path | None = field(
        default=None,
        metadata=_meta(
            "ECGLAB_MONITOR_DIR",
            parse_optional_path,
            "folder of 'ecglab monitor' runs: the newest report feeds the model card and /metrics gauges",
        ),
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "ECGLAB_CORS_ORIGINS",
            parse_cors,
            "comma-separated browser origins allowed to call the CDS Hooks endpoints (CORS), e.g. "
            "https://sandbox.cds-hooks.org; '*' only with auth on; empty = no CORS",
        ),
    )
    log_level: str = field(
        default="INFO", metadata=_meta("ECGLAB_LOG_LEVEL", parse_log_level, "log level of the service")
    )
    metrics: bool = field(
        default=True, metadata=_meta("ECGLAB_METRICS", parse_bool, "serve Prometheus metrics at /metrics")
    )
    metrics_dir: Path | None = field(
        default=None,
        metadata=_meta(
            "ECGLAB_METRICS_DIR",
            parse_optional_path,
            "prometheus multiprocess folder (empty: ecglab serve makes a fresh one)",
        ),
    )
    jwt_leeway_s: int = field(
        default=30,
        metadata=_meta("ECGLAB_JWT_LEEWAY_S", int_parser(0, 300), "clock skew tolerated on exp/iat/nbf"),
    )
    jwt_max_lifetime_s: int = field(
        default=3600,
        metadata=_meta(
            "ECGLAB_JWT_MAX_LIFETIME_S",
            int_parser(60, 86_400),
            "reject JWTs whose exp lies further ahead (bounds the replay cache)",
        ),
    )
    jwks_cache_s: int = field(
        default=300,
        metadata=_meta("ECGLAB_JWKS_CACHE_S", int_parser(0, 86_400), "how long a fetched JWKS is reused"),
    )
    jwks_refetch_s: int = field(
        default=30,
        metadata=_meta(
            "ECGLAB_JWKS_REFETCH_S",
            int_parser(0, 3600),
            "least seconds between two fetches of one JWKS URL when a token names an unknown kid",
        ),
    )
    jwks_timeout_ms: int = field(
        default=2000,
        metadata=_meta("ECGLAB_JWKS_TIMEOUT_MS", int_parser(50, 30_000), "timeout of one JWKS download"),
    )

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``ECGLAB_*`` variable (unset → default) and validate the result."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = f.metadata["env"]
            if var in env:
                values[f.name] = f.metadata["parser"](env[var], var)
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Settings:
        """Build from a dict keyed by field name or ``ECGLAB_*`` name; values may be typed or strings.

        Unknown keys are an error (a typo must not silently fall back to a default).
        """
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        by_env = {f.metadata["env"]: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            f = by_name.get(key) or by_env.get(key)
            if f is None:
                raise ConfigError(f"unknown setting {key!r}; see 'ecglab serve --help'")
            values[f.name] = _coerce(value, f, key)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field rules that a single parser cannot see."""
        if self.auth and self.issuers is None:
            raise ConfigError(
                "ECGLAB_ISSUERS: required while ECGLAB_AUTH is on (or set ECGLAB_AUTH=off for development)"
            )
        if self.issuers is not None and not self.issuers.is_file():
            raise ConfigError(f"ECGLAB_ISSUERS: {self.issuers} is not a file")
        if not self.auth and "*" in self.cors_origins:
            raise ConfigError(
                "ECGLAB_CORS_ORIGINS: '*' would let any web page call a service without authentication; "
                "with ECGLAB_AUTH=off name the origins (e.g. https://sandbox.cds-hooks.org)"
            )
        if self.demo and (self.auth or not self.dev_fhir_servers):
            raise ConfigError(
                "ECGLAB_DEMO: the demo page reads FHIR data without a user's token; it needs ECGLAB_AUTH=off "
                "and the FHIR server in ECGLAB_DEV_FHIR_SERVERS"
            )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed, validated again."""
        settings = dataclasses.replace(self, **changes)
        settings.check()
        return settings

    @property
    def log_level_number(self) -> int:
        """The numeric logging level of :attr:`log_level`."""
        return int(logging.getLevelName(self.log_level))


def _coerce(value: Any, f: dataclasses.Field[Any], key: str) -> Any:
    """Turn a typed mapping value into the field's type by way of its parser (one validation path)."""
    parser: Parser = f.metadata["parser"]
    if isinstance(value, str):
        return parser(value, key)
    if value is None:
        return parser("", key)
    if isinstance(value, bool):
        return parser("on" if value else "off", key)
    if isinstance(value, (int, float, Path)):
        return parser(str(value), key)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, IndicatorRule) for v in value) and value:
            return tuple(value)
        return parser(",".join(str(v) for v in value), key)
    raise ConfigError(f"{key}: unsupported value type {type(value).__name__}")


def describe_settings() -> list[tuple[str, str, str]]:
    """``(environment variable, default as text, help)`` for every setting, in declaration order."""
    rows = []
    for f in dataclasses.fields(Settings):
        rows.append((f.metadata["env"], _default_text(f.name, f.default), f.metadata["help"]))
    return rows


def _default_text(name: str, value: Any) -> str:
    """A default as ``ecglab serve --help`` shows it."""
    if name == "indicator_map":
        return DEFAULT_INDICATOR_MAP
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(empty)"
    if value is None or value == "":
        return "(empty)"
    if name == "model_dir":
        return "<package>/../models"
    return str(value)
