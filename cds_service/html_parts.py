"""Pieces of the service's static HTML reports (model card, monitor report), written once.

Both pages are self-contained (no external assets), printable, and built from pre-escaped cells:
:func:`esc` escapes every value that reaches the page, :func:`num` and :func:`ci` format figures,
:func:`table` lays out rows.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

BASE_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:1.5em auto;"
    "padding:0 1em;color:#111;line-height:1.4}"
    "h2{border-bottom:1px solid #ccc}"
    "table{border-collapse:collapse;font-size:13px;margin:.5em 0 1em}"
    "td,th{border:1px solid #bbb;padding:4px 7px;text-align:left;vertical-align:top}th{background:#f0f0f0}"
    "td.num{text-align:right;white-space:nowrap}"
    "@media print{body{margin:0;max-width:none}h2{page-break-after:avoid}tr{page-break-inside:avoid}}"
)
"""Layout shared by every report page; each page appends its own rules."""


def esc(value: Any) -> str:
    """Escaped text of ``value`` ('—' for ``None``)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    """A finite number with ``digits`` decimals, else '—'."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def ci(point: Any, low: Any, high: Any) -> str:
    """'0.957 [0.927, 0.983]', or '—' without a point estimate."""
    return "—" if num(point) == "—" else f"{num(point)} [{num(low)}, {num(high)}]"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] | None = None) -> str:
    """A table of pre-escaped cells ('<p>None.</p>' without rows).

    Columns listed in ``numeric`` are right-aligned; with ``numeric`` left out, every cell that
    looks like a number (or '—') is.
    """
    body = []
    for row in rows:
        cells = "".join(
            f"<td class='num'>{cell}</td>"
            if (i in numeric if numeric is not None else cell[:1].isdigit() or cell == "—")
            else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return "<p>None.</p>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
