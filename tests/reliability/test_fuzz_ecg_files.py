"""Fuzzing the ECG file readers with mutated real files: every outcome is a result or a rejection.

Seeds are the real files of ``../shared/ecg-samples/`` (when that folder is there) and of
``tests/data/ecg/``, plus files built here for formats without a real sample (a WFDB zip, an EDF
file when ``edfio`` is installed, a deflated DICOM, a UTF-16 MUSE export). Each mutated file is
derived from its index alone (``random.Random(f"{SEED}:{index}")``), so a failure reproduces with
its index; the offending file is also written under ``test-artifacts/fuzz-ecg/`` and named in
the assertion message.

Mutations: bit flips, byte overwrites with boundary values, truncation, header edits, oversized
numeric fields (ASCII and binary), wrong encodings (UTF-16 declared or not, with and without BOM,
DTDs and entities inside), nested archives (zip in zip, zip bombs, lying member sizes), duplicated
sections, splices of two files, deflated DICOM data sets (and deflate bombs). The hint handed to
:func:`read_file` is the seed's format or any registered one, so a mutation that breaks a
signature still reaches a reader. The readers are read from ``READER_MODULES`` at run time.

Each file goes the service's way: :func:`read_file` with the service's limits →
:func:`to_model_leads` → :func:`prepare_ecg`. Asserted: nothing but :class:`EcgRejected`
escapes; no reader raises an unexpected exception that ``read_file`` has to turn into
``unreadable`` (a reader bug); every file within :data:`FILE_BUDGET_S` of CPU time (the work it
caused; wall time on a shared machine also counts other processes, and is recorded); tracemalloc
peak per file within :data:`PEAK_BUDGET_BYTES`. Recorded: counts per outcome, the slowest file
(CPU and wall), the largest peak, the process's peak RSS. ``make test`` runs :data:`SHORT_FILES`
files; ``make soak`` runs :data:`SOAK_FILES` on every core.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import os
import random
import re
import resource
import struct
import time
import tracemalloc
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from cds_service.ecg.canonical import to_model_leads
from cds_service.ecg.prepare import prepare_ecg
from cds_service.ecg.readers import FORMATS, READER_MODULES, detect_format, read_file
from cds_service.ecg.record import EcgRejected
from cds_service.ecg.select import lead_aliases, read_limits
from fhir_mappings import load_mappings
from tests.figures import record_figure

SEED = 20260414
SHORT_FILES = 1500
SOAK_FILES = 100_000
FILE_BUDGET_S = 2.0
PEAK_BUDGET_BYTES = 100 * 1024 * 1024
TRACE_EVERY_SHORT = 2  # tracemalloc follows every second file of the short pass (it slows parsing)
TRACE_EVERY_SOAK = 10  # and every tenth of the soak run

ROOT = Path(__file__).resolve().parents[2]
SHARED_SAMPLES = ROOT.parent / "shared" / "ecg-samples"
OWN_SAMPLES = ROOT / "tests" / "data" / "ecg"
ARTIFACTS = ROOT / "test-artifacts" / "fuzz-ecg"
SAMPLE_SUFFIXES = frozenset({".dcm", ".xml", ".scp", ".edf", ".zip"})
WRAPPED = " reader failed ("  # read_file's wording for a reader's unexpected exception


@dataclass(frozen=True)
class Seed:
    """One starting file: a name, its bytes, the format its reader reports."""

    name: str
    data: bytes
    fmt: str | None


@dataclass
class Result:
    """What fuzzing one index gave."""

    index: int
    name: str
    outcome: str
    seconds: float  # CPU time of this process: the work the file caused, whatever else runs
    wall_seconds: float
    peak_bytes: int | None
    problem: str | None = None


@dataclass
class Tally:
    """Results of many indices, merged."""

    outcomes: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    slowest: Result | None = None
    slowest_wall: Result | None = None
    largest: Result | None = None
    problems: list[Result] = field(default_factory=list)

    def add(self, result: Result, fmt: str) -> None:
        self.outcomes[result.outcome] += 1
        self.formats[fmt] += 1
        self.note(result)
        if result.problem is not None:
            self.problems.append(result)

    def note(self, result: Result) -> None:
        """Keep ``result`` if it is the slowest (CPU, wall) or largest so far."""
        if self.slowest is None or result.seconds > self.slowest.seconds:
            self.slowest = result
        if self.slowest_wall is None or result.wall_seconds > self.slowest_wall.wall_seconds:
            self.slowest_wall = result
        if result.peak_bytes is not None and (
            self.largest is None or result.peak_bytes > (self.largest.peak_bytes or 0)
        ):
            self.largest = result


# --------------------------------------------------------------------------- seeds


def _built_seeds() -> list[tuple[str, bytes]]:
    """Files for formats without a real sample here, and re-encodings of real ones."""
    from model_training.ecg_writers import encode_wfdb_zip

    rng = np.random.default_rng(SEED)
    t = np.arange(5000) / 500.0
    digital = np.round(
        np.sin(2 * np.pi * 1.2 * t)[:, None] * rng.uniform(50, 200, 12)[None, :]
        + rng.normal(0, 5, (5000, 12))
    ).astype(np.int16)
    names = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
    built = [("built/record.wfdb.zip", encode_wfdb_zip(digital, 200.0, 500, names, "rec"))]
    muse = (OWN_SAMPLES / "guangxi_teaching_sinus_rhythm.xml").read_bytes()
    built.append(("built/muse-utf16.xml", muse.decode("utf-8").encode("utf-16")))
    built.append(
        ("built/deflated.dcm", _deflated((OWN_SAMPLES / "guangxi_teaching_sinus_rhythm.dcm").read_bytes()))
    )
    edf = _edf(digital, names)
    if edf is not None:
        built.append(("built/record.edf", edf))
    return built


def _edf(digital: np.ndarray, names: tuple[str, ...]) -> bytes | None:
    """A 10 s, 500 Hz, 12-lead EDF file in µV, or ``None`` without ``edfio``."""
    try:
        import edfio
    except ImportError:
        return None
    signals = [
        edfio.EdfSignal(
            digital[:, i].astype(np.float64) * 5.0,
            sampling_frequency=500.0,
            label=name,
            physical_dimension="uV",
        )
        for i, name in enumerate(names)
    ]
    out = io.BytesIO()
    edfio.Edf(signals).write(out)
    return out.getvalue()


def _deflated(dicom: bytes) -> bytes:
    """``dicom`` re-written with the Deflated Explicit VR Little Endian transfer syntax."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(dicom))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@cache
def seeds() -> tuple[Seed, ...]:
    """Every distinct seed file with the format its content is detected as."""
    paths = [
        p for folder in (SHARED_SAMPLES, OWN_SAMPLES) if folder.is_dir() for p in sorted(folder.rglob("*"))
    ]
    named = [
        (str(p.relative_to(p.parents[1])), p.read_bytes())
        for p in paths
        if p.suffix.lower() in SAMPLE_SUFFIXES
    ]
    named += _built_seeds()
    seen: set[str] = set()
    found: list[Seed] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, data in named:
            digest = hashlib.sha256(data).hexdigest()
            if digest not in seen:
                seen.add(digest)
                found.append(Seed(name, data, detect_format(data)))
    return tuple(found)


# --------------------------------------------------------------------------- mutations

INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
BINARY_INTS = (0, 0xFFFF, 0x7FFF, 0x8000, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 1 << 24)
HUGE_TEXT = (b"999999999999", b"0", b"-1", b"1e308", b"NaN", b"-99999", b"4294967296", b"1e-300", b"")
ENTITY_BOMB = '<!DOCTYPE RestingECG [<!ENTITY a "{}"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'.format(
    "x" * 64
)


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        start = rng.randrange(len(out))
        for i in range(start, min(start + rng.randint(1, 8), len(out))):
            out[i] = rng.choice(INTERESTING_BYTES)
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def header_edit(rng: random.Random, data: bytes) -> bytes:
    head = min(len(data), 2048)
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        out[rng.randrange(head)] = rng.randrange(256)
    return bytes(out)


def oversize_numbers(rng: random.Random, data: bytes) -> bytes:
    """Replace numbers stated as text, or aligned binary integers, with extreme values."""
    runs = [m.span() for m in re.finditer(rb"\d{1,12}", data[:200_000])]
    if runs and rng.random() < 0.6:
        out = data
        for start, end in sorted(rng.sample(runs, min(len(runs), rng.randint(1, 4))), reverse=True):
            out = out[:start] + rng.choice(HUGE_TEXT) + out[end:]
        return out
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        width = rng.choice((2, 4))
        at = rng.randrange(0, max(len(out) - width, 1), width)
        out[at : at + width] = struct.pack("<I", rng.choice(BINARY_INTS))[:width]
    return bytes(out)


def reencode(rng: random.Random, data: bytes) -> bytes:
    """XML in another encoding than the bytes or the declaration say, possibly with a DTD; else a flip."""
    if not data.lstrip(b"\xef\xbb\xbf\xff\xfe").lstrip(b"\x00 \r\n\t").startswith((b"<", b"\x00<", b"<\x00")):
        return flip_bits(rng, data)
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
    text = data.decode("utf-16" if utf16 else "latin-1", errors="replace")
    choice = rng.randrange(5)
    if choice == 0:
        text = re.sub(r"<!DOCTYPE[^>]*>", "", text, count=1)
        text = re.sub(r"(<\?xml[^>]*\?>)?", lambda m: (m.group(0) or "") + ENTITY_BOMB, text, count=1)
        text = re.sub(r"<(Waveform|LeadData|component|Waveforms)>", r"<\1>&b;", text, count=1)
    elif choice == 1:
        text = re.sub(r'encoding="[^"]*"', 'encoding="utf-8"', text, count=1)
    elif choice == 2:
        text = re.sub(r'encoding="[^"]*"', 'encoding="utf-16"', text, count=1)
    codec = rng.choice(("utf-16", "utf-16-le", "utf-16-be", "utf-8", "latin-1", "utf-32"))
    return text.encode(codec, errors="replace")


def nest_archive(rng: random.Random, data: bytes) -> bytes:
    """The file inside a zip (as a WFDB member, in a zip in a zip, as a bomb, with lying sizes)."""
    choice = rng.randrange(4)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        if choice == 0:
            archive.writestr("rec.hea", b"rec 12 500 5000\n" + b"rec.dat 16 200 16 0 0 0 0 I\n" * 12)
            archive.writestr("rec.dat", data)
        elif choice == 1:
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w", compression=zipfile.ZIP_DEFLATED) as nested:
                nested.writestr("rec.hea", b"rec 1 500 5000\nrec.dat 16 200 16 0 0 0 0 I\n")
                nested.writestr("rec.dat", data)
            archive.writestr("rec.hea", b"rec 1 500 5000\nrec.dat 16 200 16 0 0 0 0 I\n")
            archive.writestr("rec.dat", inner.getvalue())
        else:
            archive.writestr("rec.hea", b"rec 1 500 5000\nrec.dat 16 200 16 0 0 0 0 I\n")
            archive.writestr("rec.dat", bytes(rng.choice((10**5, 10**6, 8 * 10**6))))
    packed = out.getvalue()
    if choice == 3:  # lie about the sizes in the central directory: declare them small
        packed = re.sub(
            rb"PK\x01\x02(.{16})(.{4})(.{4})",
            lambda m: b"PK\x01\x02" + m.group(1) + m.group(2) + struct.pack("<I", 64),
            packed,
            flags=re.DOTALL,
        )
    return packed


def duplicate_section(rng: random.Random, data: bytes) -> bytes:
    """A slice of the file (an XML element when there is one) repeated, several times at most."""
    elements = [
        m.span()
        for m in re.finditer(
            rb"<(LeadData|sequence|Waveform|parsedwaveforms)[\s>].*?</\1>", data[:2_000_000], re.DOTALL
        )
    ]
    if elements and rng.random() < 0.5:
        start, end = rng.choice(elements)
    else:
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 4096))
    piece = data[start:end] * rng.randint(1, 4)
    at = rng.randrange(len(data) + 1)
    return data[:at] + piece + data[at:]


def splice(rng: random.Random, data: bytes) -> bytes:
    other = rng.choice(seeds()).data
    return data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]


def deflate_wrap(rng: random.Random, data: bytes) -> bytes:
    """A DICOM file's data set deflated (then mutated), a deflate bomb, or a truncated stream."""
    pristine = [i for i, seed in enumerate(seeds()) if seed.data is data]
    deflated = _deflated_seed(pristine[0]) if pristine else None
    if deflated is None:
        return flip_bits(rng, data)
    choice = rng.randrange(3)
    if choice == 0:
        return flip_bits(rng, deflated)
    meta_end = _meta_end(deflated)
    if choice == 1:  # a bomb: megabytes of zeros from a few kilobytes
        return deflated[:meta_end] + _zero_deflate(rng.choice((10**6, 5 * 10**7)))
    return deflated[: rng.randrange(meta_end, len(deflated))]  # a truncated stream


@cache
def _deflated_seed(index: int) -> bytes | None:
    """The deflated re-write of the ``index``-th seed (``None`` when it is not DICOM)."""
    data = seeds()[index].data
    if data[128:132] != b"DICM":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _deflated(data)
    except Exception:  # a seed pydicom cannot rewrite is simply not deflated
        return None


def _meta_end(dicom: bytes) -> int:
    """Where a DICOM file's meta information group ends (its data set starts)."""
    from pydicom.filereader import read_dataset

    stream = io.BytesIO(dicom)
    stream.seek(132)
    read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    return stream.tell()


@cache
def _zero_deflate(size: int) -> bytes:
    """``size`` zero bytes as a raw deflate stream."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(bytes(size)) + packer.flush()


MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "flip": flip_bits,
    "overwrite": overwrite_bytes,
    "truncate": truncate,
    "header": header_edit,
    "numbers": oversize_numbers,
    "encoding": reencode,
    "archive": nest_archive,
    "duplicate": duplicate_section,
    "splice": splice,
    "deflate": deflate_wrap,
}


def mutated(index: int) -> tuple[str, bytes, str | None, str]:
    """The ``index``-th fuzz case: its name, bytes, the hint handed to read_file, the seed's format."""
    rng = random.Random(f"{SEED}:{index}")
    seed = seeds()[index % len(seeds())]
    data = seed.data
    names = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        name = rng.choice(tuple(MUTATORS))
        data = MUTATORS[name](rng, data) if data else data
        names.append(name)
    hint = seed.fmt if rng.random() < 0.7 else rng.choice((None, *FORMATS))
    return f"{index}-{'+'.join(names)}-{Path(seed.name).name}", data, hint, seed.fmt or "none"


# --------------------------------------------------------------------------- running


@cache
def _service_ecg() -> tuple[object, dict[str, list[str]]]:
    ecg = load_mappings().ecg
    return read_limits(ecg), lead_aliases(ecg)


def decode_to_model_input(data: bytes, hint: str | None) -> str:
    """The service's path for one file; the outcome name (``ok`` or ``rejected:<reason>``)."""
    limits, aliases = _service_ecg()
    try:
        recording = read_file(data, limits, hint)  # type: ignore[arg-type]
        model = to_model_leads(recording, aliases, min_duration_s=2.5)
        prepared = prepare_ecg(model.signal, model.fs, model.lead_names)
    except EcgRejected as exc:
        if WRAPPED in str(exc) and exc.__cause__ is not None:
            return f"reader-bug:{type(exc.__cause__).__name__}"
        return f"rejected:{exc.reason}"
    if prepared.shape != (1000, 12) or not np.isfinite(prepared).all():
        return "bad-model-input"
    return "ok"


def fuzz_one(index: int, trace: bool) -> tuple[Result, str]:
    """Fuzz one index: decode its file, time it, optionally trace its allocations."""
    name, data, hint, fmt = mutated(index)
    if trace:
        tracemalloc.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = decode_to_model_input(data, hint)
    except Exception as exc:  # the finding this suite exists for
        outcome, problem = f"escaped:{type(exc).__name__}", f"{type(exc).__name__}: {str(exc)[:200]}"
    seconds = time.process_time() - cpu_started
    wall = time.perf_counter() - started
    peak = None
    if trace:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if outcome.startswith(("reader-bug", "bad-model-input")):
        problem = outcome
    if seconds > FILE_BUDGET_S:
        problem = f"took {seconds:.2f} s of CPU (budget {FILE_BUDGET_S} s)"
    if peak is not None and peak > PEAK_BUDGET_BYTES:
        problem = f"traced peak {peak / 2**20:.0f} MB (budget {PEAK_BUDGET_BYTES / 2**20:.0f} MB)"
    if problem is not None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.bin").write_bytes(data)
    return Result(index, name, outcome, seconds, wall, peak, problem), fmt


@cache
def warm_up() -> dict[str, str]:
    """Decode every seed once, unmutated, so imports and first-call costs are not timed as a file's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {seed.name: decode_to_model_input(seed.data, seed.fmt) for seed in seeds()}


def fuzz_range(start: int, stop: int, trace_every: int) -> Tally:
    """Fuzz indices ``start``..``stop`` (a worker's share in the soak run)."""
    warm_up()
    tally = Tally()
    for index in range(start, stop):
        result, fmt = fuzz_one(index, trace=index % trace_every == 0)
        tally.add(result, fmt)
    return tally


def _merge(tallies: list[Tally]) -> Tally:
    merged = Tally()
    for tally in tallies:
        merged.outcomes.update(tally.outcomes)
        merged.formats.update(tally.formats)
        merged.problems += tally.problems
        for result in (tally.slowest, tally.slowest_wall, tally.largest):
            if result is not None:
                merged.note(result)
    return merged


def _report(tally: Tally, files: int, seconds: float, label: str) -> None:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\n{label}: {files} mutated files in {seconds:.1f} s from {len(seeds())} seeds")
    for outcome, count in sorted(tally.outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        if count:
            print(f"  {count:7d}  {outcome}")
    print("  seeds by format: " + ", ".join(f"{fmt} {n}" for fmt, n in sorted(tally.formats.items()) if n))
    assert tally.slowest is not None
    record_figure(f"{label}: files / seconds", f"{files} in {seconds:.1f} s")
    record_figure(f"{label}: accepted / rejected", f"{tally.outcomes['ok']} / {files - tally.outcomes['ok']}")
    assert tally.slowest_wall is not None
    record_figure(
        f"{label}: slowest file (CPU)", f"{tally.slowest.seconds * 1000:.0f} ms ({tally.slowest.name})"
    )
    record_figure(
        f"{label}: slowest file (wall)",
        f"{tally.slowest_wall.wall_seconds * 1000:.0f} ms ({tally.slowest_wall.name})",
    )
    if tally.largest is not None and tally.largest.peak_bytes is not None:
        record_figure(
            f"{label}: largest traced peak",
            f"{tally.largest.peak_bytes / 2**20:.1f} MB ({tally.largest.name})",
        )
    record_figure(f"{label}: peak RSS", f"{rss_mb:.0f} MB (children {children_mb:.0f} MB)")


def _assert_clean(tally: Tally) -> None:
    if tally.problems:
        lines = [
            f"{r.name}: {r.problem} (file: {ARTIFACTS / (r.name + '.bin')})" for r in tally.problems[:20]
        ]
        pytest.fail(f"{len(tally.problems)} fuzzed ECG file(s) misbehaved:\n" + "\n".join(lines))


# --------------------------------------------------------------------------- tests


def test_every_registered_reader_has_a_seed_or_a_hinted_path() -> None:
    """Seeds cover the formats with files here; the others still get every mutated file by hint."""
    registered = set(FORMATS)
    assert len(registered) == len(READER_MODULES)
    covered = {seed.fmt for seed in seeds()}
    assert {"dicom", "wfdb-zip", "muse-xml"} <= covered
    hints = {mutated(i)[2] for i in range(400)}
    assert registered <= hints, f"formats never hinted: {sorted(registered - hints)}"


def test_mutation_is_deterministic_per_index() -> None:
    """The same index gives the same file, so a failure reproduces from its index alone."""
    assert mutated(1234) == mutated(1234)
    assert mutated(1234)[1] != mutated(1235)[1]


def test_fuzzed_ecg_files_short_pass() -> None:
    """make test: 1 500 mutated files, each a result or a rejection, within time and memory."""
    started = time.perf_counter()
    tally = fuzz_range(0, SHORT_FILES, trace_every=TRACE_EVERY_SHORT)
    _report(tally, SHORT_FILES, time.perf_counter() - started, "ECG fuzz (short)")
    _assert_clean(tally)
    assert sum(tally.outcomes.values()) == SHORT_FILES
    assert tally.outcomes["ok"] > 0, "some mutations leave a readable ECG; none did"


@pytest.mark.soak
def test_fuzzed_ecg_files_soak() -> None:
    """make soak: 100 000 mutated files on every core, same assertions (tracemalloc on a sample)."""
    workers = max(os.cpu_count() or 1, 1)
    bounds = np.linspace(SHORT_FILES, SHORT_FILES + SOAK_FILES, workers * 8 + 1).astype(int)
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(
            pool.map(
                fuzz_range, bounds[:-1].tolist(), bounds[1:].tolist(), [TRACE_EVERY_SOAK] * (len(bounds) - 1)
            )
        )
    tally = _merge(parts)
    _report(tally, SOAK_FILES, time.perf_counter() - started, "ECG fuzz (soak)")
    _assert_clean(tally)
    assert sum(tally.outcomes.values()) == SOAK_FILES


def test_base64_of_mutated_files_is_rejected_the_same_way() -> None:
    """A mutated file handed over as base64 text (a Media attachment mistaken for bytes) is a rejection."""
    name, data, hint, _ = mutated(7)
    outcome = decode_to_model_input(base64.b64encode(data), hint)
    assert outcome.startswith("rejected:"), f"{name}: {outcome}"
