"""What the service publishes about its model: the model card and the local-monitoring gauges.

* ``GET /cds-services/model-card`` (JSON) and ``GET /model-card`` (HTML) serve the card of
  :func:`cds_service.model_card.build_model_card`, built per request by :class:`ModelCardSource`
  from the served model's manifest, the site file (``ECGLAB_SITE_INFO``, read at start-up: a bad
  file stops the service), the evaluation's subgroup figures and the newest monitor report. The
  subgroup figures are the manifest's ``evaluation["subgroups"]`` when the exporter stored them,
  else the ``subgroups`` of a ``metrics.json`` beside the model's ONNX file, else the card says
  they were not computed. No patient data is involved anywhere.
* :func:`gauge_exposition` renders the newest report's ``gauges`` (``ecglab monitor``) as
  Prometheus text, appended to ``/metrics``.
* :func:`card_link` is the ``links`` entry every card carries: the HTML model card, type
  ``absolute``.

:class:`LatestReport` finds the newest report in ``ECGLAB_MONITOR_DIR``: it stats the candidate
files on each use and parses them again only when one changed, so a new monitor run shows up on
the next request of every worker without a restart.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from cds_service.model_card import build_model_card
from cds_service.monitor.report import REPORT_FILE, load_latest_report
from cds_service.site_info import SiteInfo
from fhir_mappings.manifest import Manifest

log = logging.getLogger(__name__)

MODEL_CARD_PATH = "/model-card"
MODEL_CARD_JSON_PATH = "/cds-services/model-card"
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def card_link(public_url: str) -> dict[str, str]:
    """The card ``links`` entry pointing at the HTML model card (CDS Hooks Link, type ``absolute``)."""
    return {
        "label": "Model card: what this model is, how it was validated, how it performs here",
        "url": public_url.rstrip("/") + MODEL_CARD_PATH,
        "type": "absolute",
    }


class LatestReport:
    """The newest ``ecglab monitor`` report under a folder (``{}`` without folder or report)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._report: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        """The newest report, re-read when a candidate file appeared, changed or went away."""
        if self.directory is None:
            return {}
        stamp = self._stamp_now(self.directory)
        with self._lock:
            if stamp != self._stamp:
                self._report = load_latest_report(self.directory) if stamp else {}
                self._stamp = stamp
            return self._report

    @staticmethod
    def _stamp_now(directory: Path) -> tuple[tuple[str, int, int], ...]:
        """(path, mtime, size) of every report file :func:`load_latest_report` would consider."""
        stamps = []
        for path in [directory / REPORT_FILE, *sorted(directory.glob(f"*/{REPORT_FILE}"))]:
            try:
                stat = path.stat()
            except OSError:
                continue
            stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)


def evaluation_metrics(manifest: Manifest, model_dir: Path | None) -> dict[str, Any] | None:
    """The evaluation figures the card needs beyond the manifest (its ``subgroups``), or ``None``."""
    stored = manifest.evaluation.get("subgroups")
    if isinstance(stored, Mapping):
        return {"subgroups": dict(stored)}
    if model_dir is None:
        return None
    path = model_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("model card: %s unreadable (%s); subgroup figures left out", path, exc)
        return None
    return metrics if isinstance(metrics, dict) else None


class ModelCardSource:
    """Builds the served model's card on demand (``card()`` is ``None`` for a runtime without manifest)."""

    def __init__(
        self,
        manifest: Manifest | None,
        model_dir: Path | None,
        site: SiteInfo,
        report: LatestReport,
        public_url: str,
    ) -> None:
        self.manifest = manifest
        self.site = site
        self.report = report
        self.html_url = public_url.rstrip("/") + MODEL_CARD_PATH
        self.json_url = public_url.rstrip("/") + MODEL_CARD_JSON_PATH
        self.metrics = evaluation_metrics(manifest, model_dir) if manifest is not None else None

    def card(self) -> dict[str, Any] | None:
        """The JSON model card as of now (the newest monitor report included)."""
        if self.manifest is None:
            return None
        return build_model_card(
            self.manifest,
            self.site,
            self.metrics,
            local_report=self.report.get() or None,
            card_url=self.html_url,
        )


class _ReportGauges:
    """A collector yielding a report's gauges as metric families (one family per name)."""

    def __init__(self, gauges: Sequence[Any]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, tuple[GaugeMetricFamily, tuple[str, ...]]] = {}
        for gauge in self.gauges:
            if not isinstance(gauge, Mapping):
                continue
            name, value, labels = gauge.get("name"), gauge.get("value"), gauge.get("labels") or {}
            if (
                not isinstance(name, str)
                or not METRIC_NAME.fullmatch(name)
                or not isinstance(labels, Mapping)
            ):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            keys = tuple(sorted(str(k) for k in labels))
            if not all(LABEL_NAME.fullmatch(k) for k in keys):
                continue
            if name not in families:
                families[name] = (GaugeMetricFamily(name, str(gauge.get("help", "")), labels=keys), keys)
            family, family_keys = families[name]
            if keys == family_keys:
                family.add_metric([str(labels[k]) for k in keys], float(value))
        for family, _ in families.values():
            yield family


def gauge_exposition(report: Mapping[str, Any]) -> bytes:
    """Prometheus text of ``report["gauges"]`` (malformed entries skipped; empty without a report)."""
    gauges = report.get("gauges")
    if not isinstance(gauges, list) or not gauges:
        return b""
    registry = CollectorRegistry()
    registry.register(_ReportGauges(gauges))
    return generate_latest(registry)
