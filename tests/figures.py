"""Pytest plugin: measured figures (throughput, latencies, counts) printed once at the end of the run.

The reliability suites measure numbers that a reader of the test run should see without ``-s``:
requests per second, p50/p95/p99 latencies, fuzzed request counts, fault timings. A test calls
:func:`record_figure`; this plugin's ``pytest_terminal_summary`` hook prints every figure of the
session, one line each, in a section of its own, in the order they were recorded. Loaded from
``tests/conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import threading
from typing import Any

_FIGURES: list[tuple[str, str]] = []
_LOCK = threading.Lock()


def record_figure(name: str, value: Any, unit: str = "") -> None:
    """Remember one measured figure (``value`` as text, floats to 4 significant digits) for the summary."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    with _LOCK:
        _FIGURES.append((name, f"{text} {unit}".rstrip()))


def recorded_figures() -> list[tuple[str, str]]:
    """Every figure recorded so far in this session, as ``(name, value with unit)`` pairs."""
    with _LOCK:
        return list(_FIGURES)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the session's figures (nothing when no test recorded any)."""
    figures = recorded_figures()
    if not figures:
        return
    terminalreporter.section("ecglab reliability figures")
    width = max(len(name) for name, _ in figures)
    for name, value in figures:
        terminalreporter.write_line(f"{name.ljust(width)}  {value}")
