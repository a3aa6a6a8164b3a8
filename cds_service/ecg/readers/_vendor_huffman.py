"""SCP-ECG Huffman tables (section 2) and the bounded decoder of one lead's bit stream.

A table is a list of code structures: prefix length, total length, a mode switch, a base value and
the prefix itself (stored with its bits reversed). A code whose total length equals its prefix
length stands for its base value; a longer one is followed by ``total − prefix`` bits holding the
value itself (two's complement, most significant bit first); a code whose mode switch is 0 selects
table number ``base value`` for the codes that follow. Each lead starts in table 1. The number of
tables 19999 means the default table of the standard (prefixes ``0``, ``100``, ``101``, ... and two
escapes for 8- and 16-bit values).

Everything is bounded: prefixes of at most :data:`MAX_PREFIX_BITS` bits (decoded through a lookup
table of ``2**prefix`` entries, whose total size over all tables is capped), at most 16 value
bits, prefix-free tables only, and every lead decodes exactly the number of samples section 3
declares from the bytes section 6 gives it; a code that would read past those bytes is corruption.

Speed: pure Python pays per loop turn, so each table also maps every :data:`MULTI_BITS`-bit window
to all the short plain codes it holds; ECG residuals are mostly 1–5-bit codes, so one turn decodes
several samples, and a hostile stream of 1-bit codes costs a sixth of a turn per sample.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cds_service.ecg.record import EcgRejected

DEFAULT_TABLES_MARKER: int = 19999
"""Section 2's table count that selects the standard's default table."""

MAX_PREFIX_BITS: int = 16
"""Longest accepted prefix; the lookup table of a table has ``2**prefix`` entries."""

MAX_VALUE_BITS: int = 16
"""Most bits of an explicit value after a prefix (samples are 16-bit)."""

MULTI_BITS: int = 12
"""Window of the multi-code lookup."""

MAX_TABLES: int = 16
MAX_CODES: int = 1024
MAX_LOOKUP_ENTRIES: int = 1 << 20
"""Total lookup-table entries over all tables (about 8 MB of references)."""

_PLAIN, _EXTRA, _SWITCH = 0, 1, 2

Entry = tuple[int, int, int, int]
"""A decoded code: (total bits, kind, value or target table, bits of an explicit value)."""


@dataclass(frozen=True)
class Code:
    """One code structure: ``code`` is the prefix, most significant bit first."""

    prefix_bits: int
    total_bits: int
    switch: bool
    value: int
    code: int


@dataclass(frozen=True)
class Table:
    """A prefix-free table: ``lookup[next width bits]`` is one code, ``multi[next 12 bits]`` several.

    ``multi`` entries are ``(bits consumed, values)``; an entry with no values means the next code
    is long, switches tables or carries an explicit value, and goes through ``lookup``.
    """

    width: int
    lookup: list[Entry | None]
    multi: list[tuple[int, tuple[int, ...]]]


def _reverse(value: int, bits: int) -> int:
    """``value``'s lowest ``bits`` bits in reverse order."""
    return int(f"{value & ((1 << bits) - 1):0{bits}b}"[::-1], 2)


def _default_codes() -> list[Code]:
    """The standard's default table: 0 → '0', ±k → '1'*k + '0' + sign bit, and two escapes."""
    codes = [Code(1, 1, False, 0, 0)]
    for magnitude in range(1, 9):
        prefix = ((1 << magnitude) - 1) << 2  # magnitude ones, then '0', then the sign bit
        codes.append(Code(magnitude + 2, magnitude + 2, False, magnitude, prefix))
        codes.append(Code(magnitude + 2, magnitude + 2, False, -magnitude, prefix | 1))
    codes.append(Code(10, 18, False, 0, 0b1111111110))
    codes.append(Code(10, 26, False, 0, 0b1111111111))
    return codes


def _multi(width: int, lookup: list[Entry | None]) -> list[tuple[int, tuple[int, ...]]]:
    """For each 12-bit window, the plain codes that lie wholly inside it, decoded (vectorised)."""
    total = np.array([e[0] if e and e[1] == _PLAIN else 0 for e in lookup], dtype=np.int64)
    value = np.array([e[2] if e and e[1] == _PLAIN else 0 for e in lookup], dtype=np.int64)
    windows = np.arange(1 << MULTI_BITS, dtype=np.int64)
    used = np.zeros_like(windows)
    active = np.ones(windows.size, dtype=bool)
    values = np.zeros((windows.size, MULTI_BITS), dtype=np.int64)
    counts = np.zeros_like(windows)
    mask = (1 << MULTI_BITS) - 1
    for _ in range(MULTI_BITS):
        rest = (windows << used) & mask  # the unread bits, left-aligned, zeros after them
        index = rest >> (MULTI_BITS - width) if width <= MULTI_BITS else rest << (width - MULTI_BITS)
        bits = total[index]
        ok = active & (bits > 0) & (used + bits <= MULTI_BITS)
        rows = np.flatnonzero(ok)
        values[rows, counts[rows]] = value[index[rows]]
        counts[rows] += 1
        used[rows] += bits[rows]
        active = ok
    return [
        (int(u), tuple(v[:c]))
        for u, v, c in zip(used.tolist(), values.tolist(), counts.tolist(), strict=True)
    ]


def _build(codes: list[Code], what: str) -> Table:
    """Index a list of codes by their next ``width`` bits, refusing overlapping prefixes."""
    width = max(c.prefix_bits for c in codes)
    lookup: list[Entry | None] = [None] * (1 << width)
    spans = sorted(
        (c.code << (width - c.prefix_bits), 1 << (width - c.prefix_bits), i) for i, c in enumerate(codes)
    )
    end = 0
    for start, size, i in spans:
        if start < end:
            raise EcgRejected("unreadable", f"{what}: Huffman table is not prefix-free")
        code = codes[i]
        extra = code.total_bits - code.prefix_bits
        kind = _SWITCH if code.switch else _EXTRA if extra else _PLAIN
        lookup[start : start + size] = [(code.total_bits, kind, code.value, extra)] * size
        end = start + size
    return Table(width, lookup, _multi(width, lookup))


_DEFAULT: list[Table] = []


def default_table() -> Table:
    """The standard's default table (built on first use)."""
    if not _DEFAULT:
        _DEFAULT.append(_build(_default_codes(), "default"))
    return _DEFAULT[0]


def parse_tables(body: bytes, what: str) -> list[Table]:
    """Section 2's body (after the 16-byte section header) as decoding tables.

    Raises:
        EcgRejected: ``unreadable`` for truncated, oversized or malformed tables.
    """
    if len(body) < 2:
        raise EcgRejected("unreadable", f"{what}: section 2 is too short")
    count = int.from_bytes(body[:2], "little")
    if count == DEFAULT_TABLES_MARKER:
        return [default_table()]
    if not 1 <= count <= MAX_TABLES:
        raise EcgRejected("unreadable", f"{what}: {count} Huffman tables, at most {MAX_TABLES} accepted")
    tables: list[Table] = []
    offset = 2
    entries = 0
    for number in range(1, count + 1):
        if offset + 2 > len(body):
            raise EcgRejected("unreadable", f"{what}: Huffman table {number} is truncated")
        n_codes = int.from_bytes(body[offset : offset + 2], "little")
        offset += 2
        if not 1 <= n_codes <= MAX_CODES or offset + 9 * n_codes > len(body):
            raise EcgRejected("unreadable", f"{what}: Huffman table {number} declares {n_codes} codes")
        codes = []
        for k in range(n_codes):
            field = body[offset + 9 * k : offset + 9 * (k + 1)]
            prefix, total, mode = field[0], field[1], field[2]
            value = int.from_bytes(field[3:5], "little", signed=True)
            stored = int.from_bytes(field[5:9], "little")
            if not 1 <= prefix <= MAX_PREFIX_BITS or not prefix <= total <= prefix + MAX_VALUE_BITS:
                raise EcgRejected(
                    "unreadable", f"{what}: Huffman code of {prefix}/{total} bits is not accepted"
                )
            if mode == 0 and (total != prefix or not 1 <= value <= count):
                raise EcgRejected("unreadable", f"{what}: Huffman table switch to table {value} is invalid")
            codes.append(Code(prefix, total, mode == 0, value, _reverse(stored, prefix)))
        offset += 9 * n_codes
        entries += 1 << max(c.prefix_bits for c in codes)
        if entries > MAX_LOOKUP_ENTRIES:
            raise EcgRejected("unreadable", f"{what}: Huffman tables too large to decode")
        tables.append(_build(codes, what))
    return tables


def decode(stream: bytes, count: int, tables: list[Table], what: str) -> npt.NDArray[np.int64]:
    """Decode exactly ``count`` values from ``stream``, starting in the first table.

    Raises:
        EcgRejected: ``unreadable`` for an unknown code, or a code that runs past the stream.
    """
    out = array("q")
    table = tables[0]
    available = 8 * len(stream)
    size = len(stream)
    used = 0  # bits consumed
    acc = 0  # bits read but not consumed, most significant first
    held = 0
    index = 0
    produced = 0
    while produced < count:
        while held < 32:
            acc = (acc << 8) | (stream[index] if index < size else 0)
            index += 1
            held += 8
        bits, values = table.multi[acc >> (held - MULTI_BITS)]
        if values and produced + len(values) <= count and used + bits <= available:
            out.extend(values)
            produced += len(values)
        else:
            entry = table.lookup[acc >> (held - table.width)]
            if entry is None:
                raise EcgRejected("unreadable", f"{what}: invalid Huffman code at bit {used}")
            bits, kind, value, extra = entry
            if used + bits > available:
                raise EcgRejected("unreadable", f"{what}: Huffman data ends inside a code")
            if kind == _EXTRA:
                raw = (acc >> (held - bits)) & ((1 << extra) - 1)
                out.append(raw - (1 << extra) if raw >> (extra - 1) else raw)
                produced += 1
            elif kind == _SWITCH:
                table = tables[value - 1]
            else:
                out.append(value)
                produced += 1
        used += bits
        held -= bits
        acc &= (1 << held) - 1
    return np.frombuffer(out, dtype=np.int64)
