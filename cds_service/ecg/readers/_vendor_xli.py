"""Philips XLI waveform decompression: LZW with 10-bit codes, then a second-order predictor.

An XLI payload is one chunk per lead. A chunk is an 8-byte header (little-endian int32 length of
the compressed bytes, two bytes unused, int16 first residual) and LZW codes packed most significant
bit first. The LZW output holds the high bytes of all 16-bit residuals, then all the low bytes.
Sample ``i`` is ``2·x[i-1] − x[i-2] − r[i]``, where the residual ``r`` of sample 2 is the header's
value and that of sample ``i > 2`` is the stored value at ``i − 1`` minus 64; samples 0 and 1 are
stored as they are. The predictor runs in 16-bit arithmetic (it wraps), as the writer's does.

Work is bounded before and while decoding: each chunk may not inflate past the samples the header
declared (plus a little slack), the total output is checked against the byte and ratio caps of
:class:`~cds_service.ecg.record.ReadLimits` after every code, and a code that refers to a table
entry not yet defined ends the decoding as corrupt rather than being guessed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers.common import check_inflated
from cds_service.ecg.record import EcgRejected, ReadLimits

CODE_BITS: int = 10
"""Width of every LZW code."""

LAST_CODE: int = (1 << CODE_BITS) - 2
"""Highest table code; the all-ones code (1023) marks the end of a chunk."""

CHUNK_SLACK_BYTES: int = 64
"""Output a chunk may hold beyond its declared samples (writers pad the last code)."""

HEADER_BYTES: int = 8

BLOCK_CODES: int = 1 << 16
"""Codes unpacked at a time (a multiple of 4, so every block starts on a byte boundary)."""


def _code_blocks(packed: bytes, limit: int) -> Iterator[list[int]]:
    """The first ``limit`` 10-bit codes (most significant bit first), in blocks of 65536.

    A block of whole codes starts on a byte boundary (4 codes are 5 bytes), so only one block of
    bits is ever unpacked; a trailing partial code is dropped.
    """
    total = min(len(packed) * 8 // CODE_BITS, limit)
    weights = 1 << np.arange(CODE_BITS - 1, -1, -1, dtype=np.int32)
    for first in range(0, total, BLOCK_CODES):
        count = min(BLOCK_CODES, total - first)
        start = first * CODE_BITS // 8
        raw = np.frombuffer(packed[start : start + (count * CODE_BITS + 7) // 8], dtype=np.uint8)
        bits = np.unpackbits(raw)[: count * CODE_BITS].reshape(-1, CODE_BITS).astype(np.int32)
        codes: list[int] = (bits @ weights).tolist()
        yield codes


def _lzw(packed: bytes, cap: int, spent: int, limits: ReadLimits, consumed: int) -> bytes:
    """Inflate one chunk's LZW codes, refusing output beyond ``cap`` bytes or the global caps.

    ``spent`` is what earlier chunks produced and ``consumed`` the compressed size of the whole
    payload, so the ratio cap applies to the payload as a whole. Every code yields at least one
    byte, so no more than ``cap + 1`` codes are ever read, however long the chunk claims to be.
    """
    table: list[bytes] = [bytes([i]) for i in range(256)]
    out: list[bytes] = []
    produced = 0
    previous = b""
    for block in _code_blocks(packed, cap + 1):
        for code in block:
            if code > LAST_CODE:
                return b"".join(out)
            if code < len(table):
                entry = table[code]
            elif code == len(table) and previous:
                entry = previous + previous[:1]
            else:
                raise EcgRejected("unreadable", f"XLI: LZW code {code} refers to an undefined entry")
            if previous and len(table) <= LAST_CODE:
                table.append(previous + entry[:1])
            previous = entry
            out.append(entry)
            produced += len(entry)
            if produced > cap:
                raise EcgRejected("unreadable", f"XLI: a lead inflates past the {cap} bytes it declares")
            check_inflated(spent + produced, consumed, limits, "XLI waveform")
    return b"".join(out)


def _predict(stream: bytes, first: int) -> npt.NDArray[np.int16]:
    """Undo the byte split and the second-order prediction of one lead's residual stream."""
    if len(stream) % 2:
        stream += b"\x00"
    half = len(stream) // 2
    raw = np.frombuffer(stream, dtype=np.uint8)
    stored = ((raw[:half].astype(np.int64) << 8) | raw[half:]).astype(np.uint16).view(np.int16)
    values = stored.astype(np.int64)
    if values.size < 3:
        return values.astype(np.int16)
    residual = np.empty(values.size, dtype=np.int64)
    residual[:2] = 0
    residual[2] = first
    residual[3:] = values[2:-1] - 64
    # x[i] - x[i-1] = (x[i-1] - x[i-2]) - r[i]: the first difference is a running sum of residuals.
    steps = np.empty(values.size, dtype=np.int64)
    steps[0] = values[0]
    steps[1] = values[1] - values[0]
    steps[2:] = steps[1] - np.cumsum(residual[2:])
    # Linear arithmetic modulo 2**16 commutes with the sums, so wrapping once equals wrapping per step.
    return np.cumsum(steps).astype(np.int16)


def decode(payload: bytes, n_leads: int, n_samples: int, limits: ReadLimits) -> list[npt.NDArray[np.int16]]:
    """Decode the first ``n_leads`` chunks of an XLI payload into ``n_samples`` samples each.

    Raises:
        EcgRejected: ``unreadable`` for truncated or corrupt chunks or too few samples;
            ``attachment_too_large`` when the payload inflates past the limits.
    """
    cap = 2 * n_samples + CHUNK_SLACK_BYTES
    leads: list[npt.NDArray[np.int16]] = []
    offset = 0
    spent = 0
    while len(leads) < n_leads:
        if offset + HEADER_BYTES > len(payload):
            raise EcgRejected("unreadable", f"XLI: {len(leads)} lead chunks found, {n_leads} declared")
        size = int.from_bytes(payload[offset : offset + 4], "little", signed=True)
        first = int.from_bytes(payload[offset + 6 : offset + 8], "little", signed=True)
        start = offset + HEADER_BYTES
        if size < 0 or start + size > len(payload):
            raise EcgRejected("unreadable", f"XLI: chunk {len(leads) + 1} claims {size} bytes past the end")
        stream = _lzw(payload[start : start + size], cap, spent, limits, len(payload))
        spent += len(stream)
        samples = _predict(stream, first)
        if samples.size < n_samples:
            raise EcgRejected(
                "unreadable", f"XLI: lead {len(leads) + 1} holds {samples.size} samples, {n_samples} declared"
            )
        leads.append(samples[:n_samples])
        offset = start + size
    return leads
