"""``ecglab ecg inspect`` (issue 16) over the real ECG files of ``tests/data/ecg/`` and a WFDB and
an EDF record written by independent writers: the report, the exit status, and that ``--npy`` is
bit for bit the array the service hands the model for the same file sent as an attachment.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import edfio
import numpy as np
import pytest

from cds_service.cli import main
from cds_service.ecg.record import REASONS
from cds_service.features import extract_model_inputs
from cds_service.inference import ModelRuntime
from cds_service.patient_data import PatientData
from cds_service.settings import default_model_dir
from fhir_mappings import load_mappings
from fhir_mappings.manifest import find_manifest, load_manifest
from fhir_mappings.signal_spec import MODEL_LEADS
from model_training.ecg_writers import encode_wfdb_zip

DATA = Path(__file__).resolve().parents[1] / "data" / "ecg"
MAPPINGS = load_mappings()
EIGHT_LEAD_DERIVED = ["III", "aVR", "aVL", "aVF"]
WELCH_ALLYN_2006 = DATA / "vendor" / "scp_ecg" / "welchallyn_ECG_20060620_example_full_anon.SCP"

# Every real file, with the format its content must be detected as and whether 4 limb leads are derived.
REAL_FILES: dict[str, tuple[str, bool]] = {
    "guangxi_teaching_sinus_rhythm.dcm": ("dicom", False),
    "guangxi_teaching_sinus_rhythm.xml": ("muse-xml", True),
    "vendor/dicom/ecgtoolkit_Example.dcm": ("dicom", False),
    "vendor/hl7_aecg/jhu_hl7aecg-Example2.xml": ("hl7-aecg", False),
    "vendor/philips_sierra/129DYPRG.XML": ("philips-xml", False),
    "vendor/philips_sierra/2020-5-18_15-48-11.xml": ("philips-xml", False),
    "vendor/philips_sierra/3191723_ZZDEMOPTONLY_1-04_orig.xml": ("philips-xml", False),
    "vendor/scp_ecg/ecgtoolkit_Example.scp": ("scp-ecg", False),
    "vendor/scp_ecg/welchallyn_ECG_20170504_163507_123456789.SCP": ("scp-ecg", True),
}


def test_the_table_covers_every_ecg_file_in_the_test_data() -> None:
    """A file added to tests/data/ecg must be added here too (the Welch Allyn 2006 file is refused)."""
    found = {
        str(p.relative_to(DATA))
        for p in DATA.rglob("*")
        if p.is_file() and p.suffix.lower() in {".dcm", ".xml", ".scp"}
    }
    assert found == set(REAL_FILES) | {str(WELCH_ALLYN_2006.relative_to(DATA))}


@pytest.fixture(scope="module")
def runtime() -> Iterator[ModelRuntime]:
    """The bundled model on the CPU: its ``prepare`` is the service's last step before the network."""
    yield ModelRuntime.load(default_model_dir(), ["CPUExecutionProvider"])


def service_model_input(data: bytes, runtime: ModelRuntime) -> np.ndarray:
    """What the service feeds the model for ``data`` sent inline in an ECG DocumentReference."""
    now = dt.datetime.now(dt.UTC)
    document = {
        "resourceType": "DocumentReference",
        "id": "ecg-1",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11524-6"}]},
        "subject": {"reference": "Patient/p-1"},
        "date": (now - dt.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "content": [
            {
                "attachment": {
                    "contentType": "application/octet-stream",
                    "data": base64.b64encode(data).decode(),
                }
            }
        ],
    }
    patient = {"resourceType": "Patient", "id": "p-1", "gender": "female", "birthDate": "1960-01-01"}
    inputs = extract_model_inputs(PatientData(patient=patient, ecgs=[document]), mappings=MAPPINGS, now=now)
    return runtime.prepare(inputs.ecg.signal, inputs.ecg.fs, inputs.ecg.lead_names)


def inspect(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run ``ecglab ecg inspect ARGS``: (exit status, stdout, stderr)."""
    status = main(["ecg", "inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def written_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- usable files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_file_report_and_npy_match_the_service(
    name: str, tmp_path: Path, runtime: ModelRuntime, capsys: pytest.CaptureFixture[str]
) -> None:
    """Format from the content, leads as stored, and --npy equal to the service's model input."""
    path = DATA / name
    fmt, derives = REAL_FILES[name]
    status, out, err = inspect(capsys, path, "--json", "--npy", tmp_path / "in.npy")
    assert (status, err) == (0, "")
    facts = json.loads(out)
    assert facts["format"] == fmt
    assert facts["file"] == str(path) and facts["bytes"] == path.stat().st_size
    assert facts["derived_leads"] == (EIGHT_LEAD_DERIVED if derives else [])
    assert len(facts["stored_leads"]) == (8 if derives else 12)
    assert len(facts["units"]) == len(facts["stored_leads"])
    assert facts["fs"] in (500.0, 600.0, 1000.0) and 10.0 <= facts["duration_s"] <= 10.6
    assert facts["samples"] == round(facts["fs"] * facts["duration_s"])
    manifest = load_manifest(find_manifest(default_model_dir()), verify_file=False)
    assert facts["model_leads"] == manifest.ecg.lead_order == list(MODEL_LEADS)
    assert facts["model"]["version"] == manifest.version
    assert facts["model_input"] == {
        "shape": [1000, 12],
        "dtype": "float32",
        "fs": 100.0,
        "units": "mV",
        "clip_mv": 3.0,
    }
    for lead in EIGHT_LEAD_DERIVED if derives else []:
        assert facts["lead_sources"][lead] == "derived from I and II"
    array = np.load(tmp_path / "in.npy", allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (1000, 12)
    expected = service_model_input(path.read_bytes(), runtime)
    assert np.array_equal(array, expected)
    assert np.abs(array).max() > 0.1  # a real signal, not zeros


def test_text_report_names_format_device_leads_and_derivation(capsys: pytest.CaptureFixture[str]) -> None:
    """The default output is text: one labelled line per fact, warnings listed."""
    status, out, _ = inspect(capsys, DATA / "vendor/scp_ecg/welchallyn_ECG_20170504_163507_123456789.SCP")
    assert status == 0
    lines = dict(line.split(None, 1) for line in out.splitlines() if line and not line.startswith(" "))
    assert lines["format"].strip() == "scp-ecg"
    assert "Welch Allyn" in lines["device"]
    assert "600 Hz" in out and "I, II, V1, V2, V3, V4, V5, V6 (8)" in out
    assert "III, aVR, aVL, aVF (from I and II)" in out
    assert "1000×12 float32, mV at 100 Hz" in out
    assert out.rstrip().endswith("warnings       none")


def test_philips_calibration_tail_and_long_strip_are_warned(capsys: pytest.CaptureFixture[str]) -> None:
    """Quality warnings: what the reader dropped, and that only the first 10 s reach the model."""
    status, out, _ = inspect(capsys, DATA / "vendor/philips_sierra/129DYPRG.XML", "--json")
    assert status == 0
    warnings = json.loads(out)["warnings"]
    assert any("calibration pulse" in w for w in warnings)
    assert any(w.startswith("only the first 10 s of the 10.53 s") for w in warnings)


def _digital(n: int, leads: int, seed: int = 3) -> np.ndarray:
    t = np.arange(n) / 500.0
    rng = np.random.default_rng(seed)
    waves = [300 * np.sin(2 * np.pi * 1.3 * t + k) + rng.normal(0, 5, n) for k in range(leads)]
    return np.stack(waves, axis=1).astype(np.int16)  # 200 units per mV: about ±1.5 mV


def _edf_bytes() -> bytes:
    fs, seconds = 500, 10
    t = np.arange(fs * seconds) / fs
    names = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    signals = [
        edfio.EdfSignal(
            800 * np.sin(2 * np.pi * 1.1 * t + k),
            sampling_frequency=fs,
            label=f"ECG {name}",
            physical_dimension="uV",
            physical_range=(-5000, 5000),
        )
        for k, name in enumerate(names)
    ]
    buffer = io.BytesIO()
    edfio.Edf(signals, recording=edfio.Recording(equipment_code="Holter_7")).write(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["wfdb-zip", "edf"])
def test_wfdb_and_edf_records_from_independent_writers(
    fmt: str, tmp_path: Path, runtime: ModelRuntime, capsys: pytest.CaptureFixture[str]
) -> None:
    """The two formats without a real sample file here: written by wfdb and edfio, inspected alike."""
    if fmt == "wfdb-zip":
        data = encode_wfdb_zip(_digital(5000, 12), 200.0, 500, MODEL_LEADS, "rec1")
    else:
        data = _edf_bytes()
    path = tmp_path / f"record.{fmt}"
    path.write_bytes(data)
    status, out, _ = inspect(capsys, path, "--json", "--npy", tmp_path / "in.npy")
    assert status == 0
    facts = json.loads(out)
    assert facts["format"] == fmt
    assert facts["derived_leads"] == ([] if fmt == "wfdb-zip" else EIGHT_LEAD_DERIVED)
    assert np.array_equal(np.load(tmp_path / "in.npy"), service_model_input(data, runtime))


def test_inverted_lead_and_clipped_samples_are_warned(
    tmp_path: Path, runtime: ModelRuntime, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Cabrera-style '-aVR' column is used inverted and 4.5 mV peaks are clipped: both reported."""
    digital = _digital(5000, 12).astype(np.int32)
    names = list(MODEL_LEADS)
    names[MODEL_LEADS.index("aVR")] = "-aVR"
    digital[100:110, 0] = 900  # 4.5 mV at 200 units per mV
    data = encode_wfdb_zip(digital.astype(np.int16), 200.0, 500, names, "inv")
    path = tmp_path / "inverted.zip"
    path.write_bytes(data)
    status, out, _ = inspect(capsys, path, "--json", "--npy", tmp_path / "in.npy")
    assert status == 0
    facts = json.loads(out)
    assert facts["lead_sources"]["aVR"] == "--aVR" and facts["lead_sources"]["I"] == "I"
    assert "aVR is taken inverted from '-aVR'" in facts["warnings"]
    assert "I: 10 sample(s) (0.2%) beyond ±3 mV are clipped" in facts["warnings"]
    array = np.load(tmp_path / "in.npy")
    assert np.array_equal(array, service_model_input(data, runtime))
    assert 3.0 < array[:, 0].max() < 3.5  # clipped at 500 Hz, then resampled: a little overshoot


# -- refused files and bad paths ----------------------------------------------------------------------------


def _assert_rejected(out: str, err: str, reason: str) -> str:
    """One line ``rejected: <reason>: <message>`` on stdout and nothing else; returns the message."""
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1, out
    prefix = f"rejected: {reason}: "
    assert out.startswith(prefix), out
    return out[len(prefix) :].strip()


def test_right_sided_posterior_lead_set_is_rejected_naming_missing_and_present_leads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """V3R and V7 are not taken for V3/V5: missing_leads, exit 1, and no npy or png is written."""
    status, out, err = inspect(
        capsys, WELCH_ALLYN_2006, "--json", "--npy", tmp_path / "x.npy", "--png", tmp_path / "x.png"
    )
    assert status == 1
    message = _assert_rejected(out, err, "missing_leads")
    assert "lacks lead(s) V3, V5" in message
    assert "(has I, II, V3R, V1, V2, V4, V6, V7)" in message
    assert written_files(tmp_path) == []


@pytest.mark.parametrize(
    "name",
    [
        "vendor/scp_ecg/ecgtoolkit_Example.scp",
        "vendor/dicom/ecgtoolkit_Example.dcm",
        "vendor/philips_sierra/129DYPRG.XML",
        "guangxi_teaching_sinus_rhythm.xml",
    ],
)
def test_truncated_file_is_rejected_and_nothing_is_written(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Half of a real file: unreadable, exit 1, one line, no output files."""
    data = (DATA / name).read_bytes()
    cut = tmp_path / "in" / Path(name).name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, out, err = inspect(capsys, cut, "--npy", out_dir / "x.npy", "--png", out_dir / "x.png")
    assert status == 1
    _assert_rejected(out, err, "unreadable")
    assert written_files(out_dir) == []


def test_file_over_the_attachment_limit_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past ecg.yaml's max_attachment_bytes the service refuses the attachment: so does inspect."""
    big = tmp_path / "big.dcm"
    with big.open("wb") as handle:
        handle.truncate(MAPPINGS.ecg.max_attachment_bytes + 1)
    status, out, err = inspect(capsys, big)
    assert status == 1
    message = _assert_rejected(out, err, "attachment_too_large")
    assert f"{MAPPINGS.ecg.max_attachment_bytes + 1} bytes" in message


def test_unknown_content_is_rejected_with_a_known_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an ECG\n")
    status, out, err = inspect(capsys, path, "--json")
    assert status == 1
    _assert_rejected(out, err, "unknown_content_type")
    assert "unknown_content_type" in REASONS


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_path_exits_2_naming_the_file(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's InputError convention: one line on stderr naming the path, exit 2."""
    path = tmp_path / "nope.xml" if kind == "missing" else tmp_path
    status, out, err = inspect(capsys, path)
    assert (status, out) == (2, "")
    assert err.startswith("ecglab ecg: error: ") and str(path) in err and err.count("\n") == 1


def test_unwritable_output_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "no-such-folder" / "x.npy"
    status, _, err = inspect(capsys, DATA / "vendor/dicom/ecgtoolkit_Example.dcm", "--npy", target)
    assert status == 2 and str(target) in err


# -- the plot ---------------------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_png_plots_the_model_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--png writes a PNG on ECG paper: 12 strips at 10 mm/mV, 10 s at 25 mm/s (about square)."""
    target = tmp_path / "ecg.png"
    status, out, _ = inspect(capsys, DATA / "vendor/hl7_aecg/jhu_hl7aecg-Example2.xml", "--png", target)
    assert status == 0 and "hl7-aecg" in out
    data = target.read_bytes()
    width, height = _png_size(data)
    assert 900 <= width <= 1300 and 900 <= height <= 1300
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    dark = (pixels[..., :3].mean(axis=2) < 0.3).mean()
    assert 0.005 < dark < 0.2  # traces drawn, not a blank page or a black one


def test_png_without_matplotlib_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is only in the train extra: --png says so; inspection without --png still works."""
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "matplotlib" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    path = DATA / "vendor/dicom/ecgtoolkit_Example.dcm"
    status, out, err = inspect(capsys, path, "--npy", tmp_path / "x.npy", "--png", tmp_path / "x.png")
    assert (status, out) == (2, "")
    assert "--png needs matplotlib" in err and "ecglab[train]" in err
    assert written_files(tmp_path) == []
    status, _, _ = inspect(capsys, path, "--npy", tmp_path / "x.npy")
    assert status == 0 and written_files(tmp_path) == ["x.npy"]
