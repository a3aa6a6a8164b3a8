"""``ecglab serve``: run the CDS Hooks service under gunicorn, configured by ``ECGLAB_*`` variables.

Usage::

    ECGLAB_ISSUERS=issuers.yaml ECGLAB_PUBLIC_URL=https://cds.example.org ecglab serve
    ECGLAB_AUTH=off ecglab serve --port 8080            # development only (loud warning)
    ecglab serve --check                                # validate the configuration, then exit

Startup order, so that a misconfiguration stops the service with one line naming the variable
(exit status 2) instead of a crash loop of gunicorn workers:

1. read and validate every setting and the issuers file in the master process;
2. create the database tables once (workers would otherwise race to create them);
3. check that the newest model manifest and its ONNX file are intact, that the model was built
   against this ``fhir_mappings`` version, and that ONNX Runtime opens it;
4. point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder so ``/metrics`` aggregates all workers,
   configure logging, and start gunicorn (``gthread`` workers). Each worker then builds its own
   app with :func:`cds_service.app.create_app` (the ONNX session is opened after the fork).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cds_service.settings import Settings, describe_settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``ecglab serve`` flags; the epilog lists every setting with its default and variable."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Run the CDS Hooks service (discovery, patient-view / order-select / order-sign, feedback) under "
        "gunicorn. Every setting comes from an environment variable; the flags below override a few."
    )
    rows = describe_settings()
    width = max(len(name) for name, _, _ in rows)
    lines = ["settings (environment variable, default, meaning):"]
    for name, default, text in rows:
        lines.append(f"  {name.ljust(width)}  default: {default}")
        lines.append(f"  {' ' * width}  {text}")
    parser.epilog = "\n".join(lines)
    parser.add_argument("--host", help="override ECGLAB_HOST")
    parser.add_argument("--port", type=int, help="override ECGLAB_PORT")
    parser.add_argument("--workers", type=int, help="override ECGLAB_WORKERS")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate settings, issuers file, database and model manifest, then exit without serving",
    )


def resolve_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Settings from the environment with the command-line overrides applied (validated)."""
    env = dict(os.environ if environ is None else environ)
    for flag, var in (("host", "ECGLAB_HOST"), ("port", "ECGLAB_PORT"), ("workers", "ECGLAB_WORKERS")):
        value = getattr(args, flag, None)
        if value is not None:
            env[var] = str(value)
    return Settings.from_env(env)


def preflight(settings: Settings) -> str:
    """Validate everything a worker will need; returns the manifest version. Raises ConfigError."""
    from cds_service.db import init_db, make_engine
    from cds_service.issuers import load_issuers

    if settings.issuers is not None:
        load_issuers(settings.issuers)
    engine = make_engine(settings.database_url)
    try:
        init_db(engine)
    except Exception as exc:  # SQLAlchemy raises driver-specific errors; name the variable instead
        from fhir_mappings.errors import ConfigError

        raise ConfigError(f"ECGLAB_DATABASE_URL: cannot open the database ({type(exc).__name__})") from None
    finally:
        engine.dispose()
    # Everything a worker's create_app will check, so a bad model stops the master with one line
    # instead of a crash loop of workers: the manifest and the ONNX file's SHA-256, the mapping
    # version the model was built against, and that ONNX Runtime can open the graph and its inputs
    # match the manifest. This runs in a spawned child process: ONNX Runtime starts process-wide
    # threads when it opens a session, and a gunicorn master that had done so would fork workers
    # holding a half-copied runtime (they abort with "std::system_error: No such process" on exit).
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return str(pool.apply(_model_version, (str(settings.model_dir),)))


def _model_version(model_dir: str) -> str:
    """Load the model on the CPU provider (in a child process) and return its version."""
    from cds_service.inference import ModelRuntime

    return ModelRuntime.load(Path(model_dir), ["CPUExecutionProvider"]).version


def _metrics_dir(settings: Settings) -> Path:
    """A clean prometheus multiprocess folder (the configured one is emptied first)."""
    if settings.metrics_dir is None:
        return Path(tempfile.mkdtemp(prefix="ecglab-metrics-"))
    folder = settings.metrics_dir
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    return folder


def _gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings from ours: gthread workers, no preload (ONNX opens after fork), no access log."""
    from cds_service.observability import mark_worker_dead

    def child_exit(_server: Any, worker: Any) -> None:
        """Drop an exited worker's live metric files (prometheus multiprocess mode)."""
        mark_worker_dead(worker.pid)

    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        "threads": settings.threads,
        "worker_class": "gthread",
        "timeout": settings.worker_timeout_s,
        "graceful_timeout": 10,
        "keepalive": 5,
        "preload_app": False,
        "accesslog": None,
        "loglevel": settings.log_level.lower(),
        "child_exit": child_exit,
        "proc_name": "ecglab-serve",
    }


def run(args: argparse.Namespace) -> int:
    """Validate, then serve until interrupted (or just validate with ``--check``)."""
    settings = resolve_settings(args)
    version = preflight(settings)
    if args.check:
        print(f"ecglab serve: configuration OK (model {version}, auth {'on' if settings.auth else 'OFF'})")
        return 0
    metrics_dir = _metrics_dir(settings)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from gunicorn.app.base import BaseApplication

    from cds_service.observability import configure_logging

    configure_logging(settings.log_level)

    class _Server(BaseApplication):
        """gunicorn application that builds one Flask app per worker."""

        def load_config(self) -> None:
            """Hand our options to gunicorn instead of reading its command line."""
            for key, value in _gunicorn_options(settings).items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            """Build this worker's Flask app (called after the fork)."""
            from cds_service.app import create_app

            return create_app(settings)

    log.info("starting gunicorn on %s:%d with %d worker(s)", settings.host, settings.port, settings.workers)
    try:
        _Server().run()
    finally:
        if settings.metrics_dir is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
