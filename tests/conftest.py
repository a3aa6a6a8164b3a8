"""Shared pytest configuration: plugins used across the suite, and the ``soak`` switch.

Tests marked ``soak`` (long reliability and load runs) are skipped unless ``--run-soak`` is given;
``make soak`` runs ``pytest -m soak --run-soak``, ``make test`` leaves them out.
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fhir_servers",
    "tests.figures",
    "tests.service_fixtures",
    "tests.training_fixtures",
    "tests.oauth_server",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--run-soak``: also run the long tests marked ``soak``."""
    parser.addoption(
        "--run-soak",
        action="store_true",
        default=False,
        help="run the long reliability/load tests marked 'soak' (make soak)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``soak`` marker (the suite runs with --strict-markers)."""
    config.addinivalue_line("markers", "soak: long reliability/load test, run only with --run-soak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``soak`` tests unless ``--run-soak`` was given."""
    if config.getoption("--run-soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --run-soak (make soak)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
