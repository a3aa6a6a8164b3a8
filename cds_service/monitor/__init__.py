"""Local validation and monitoring: how the deployed model performs on the site's own patients.

``ecglab monitor`` (:mod:`cds_service.monitor.command`) joins the audit trail with the lab results
that later appear on the site's FHIR server and writes a report; the service exports Prometheus
gauges from the newest one (:func:`load_latest_report`). Modules, one concern each:

* :mod:`~cds_service.monitor.fhir_results`: read lab Observations by code and date, keyed by the
  patient's HMAC;
* :mod:`~cds_service.monitor.outcomes`: the training label rule per target and the join;
* :mod:`~cds_service.monitor.stats`: AUROC, PPV/sensitivity, calibration and PSI in numpy;
* :mod:`~cds_service.monitor.drift`: input distributions and drift;
* :mod:`~cds_service.monitor.feedback_stats`: clinician feedback per lab;
* :mod:`~cds_service.monitor.report` and :mod:`~cds_service.monitor.html_report`: the outputs;
* :mod:`~cds_service.monitor.progress`: the progress bar.
"""

from __future__ import annotations

from cds_service.monitor.report import load_latest_report

__all__ = ["load_latest_report"]
