"""ECG preparation and lead naming: one test per rule of method §2.2 and of the lead conventions.

``cds_service.ecg.prepare`` (interpolate, clip, resample, 10 s), ``cds_service.ecg.canonical``
(names → model leads, inverted and derived leads) and ``fhir_mappings.leads.canonical_lead`` (the
one lead-name resolver).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy.signal import resample_poly

from cds_service.ecg.canonical import LIMB_WEIGHTS, plan_leads, to_model_leads
from cds_service.ecg.prepare import prepare_ecg, prepare_ecg_batch
from cds_service.ecg.record import EcgRecording, EcgRejected
from fhir_mappings import load_mappings
from fhir_mappings.errors import InputError
from fhir_mappings.leads import LeadMatch, canonical_lead
from fhir_mappings.signal_spec import MODEL_LEADS, TARGET_FS

MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]


def constant_leads(names: list[str], fs: float = 100.0, seconds: float = 10.0) -> np.ndarray:
    """(T, C) signal whose column c holds the constant 0.1·(model index of lead c + 1) mV."""
    n = round(fs * seconds)
    return np.stack([np.full(n, 0.1 * (MODEL_LEADS.index(_lead(name)) + 1)) for name in names], axis=1)


def _lead(name: str) -> str:
    match = canonical_lead(name)
    assert match is not None, name
    return match.lead


def sine(fs: float, freq: float, seconds: float = 10.0, amplitude: float = 1.0) -> np.ndarray:
    """(T, 12) signal: the same sine on every lead."""
    t = np.arange(round(fs * seconds)) / fs
    return np.repeat((amplitude * np.sin(2 * np.pi * freq * t))[:, None], 12, axis=1)


def test_model_lead_order_and_rate() -> None:
    """Brief: model order I, II, V1–V6, III, aVR, aVL, aVF at 100 Hz; output (1000, 12) float32."""
    assert MODEL_LEADS == ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF")
    out = prepare_ecg(constant_leads(MIMIC_ORDER), 100, MIMIC_ORDER)
    assert TARGET_FS == 100 and out.shape == (1000, 12) and out.dtype == np.float32


def test_leads_reordered_by_name_from_mimic_order() -> None:
    """§2.2: columns are matched by lead name, so MIMIC's I, II, III, aVR, aVF, aVL, V1–V6 lands in model order."""
    out = prepare_ecg(constant_leads(MIMIC_ORDER), 100, MIMIC_ORDER)
    np.testing.assert_allclose(out[0], 0.1 * np.arange(1, 13), rtol=1e-6)
    shuffled = list(reversed(MIMIC_ORDER))
    np.testing.assert_array_equal(prepare_ecg(constant_leads(shuffled), 100, shuffled), out)


def test_alias_lead_names_resolve() -> None:
    """Lead names resolve case-, blank- and prefix-insensitively, plus caller-supplied aliases."""
    assert canonical_lead("Lead II") == LeadMatch("II", 1.0)
    assert canonical_lead("MDC_ECG_LEAD_AVR") == ("aVR", 1.0)
    assert canonical_lead("avl") == ("aVL", 1.0)
    assert canonical_lead(" v1 ") == ("V1", 1.0)
    assert canonical_lead("lead_v.2") == ("V2", 1.0)
    assert canonical_lead("Lead-II") == ("II", 1.0)  # a dash glued to the prefix only separates
    assert canonical_lead("C1") is None
    assert canonical_lead("C1", {"V1": ["C1"]}) == ("V1", 1.0)
    assert canonical_lead("X") is None and canonical_lead("") is None and canonical_lead("Lead") is None
    names = ["Lead I", "lead ii", "c1", "C2", "C3", "C4", "C5", "C6", "III", "AVR", "AVL", "AVF", "X"]
    aliases = {f"V{k}": [f"C{k}"] for k in range(1, 7)}
    signal = np.stack([np.full(1000, 0.1 * (k + 1)) for k in range(13)], axis=1)
    out = prepare_ecg(signal, 100, names, aliases)
    np.testing.assert_allclose(out[0], 0.1 * np.arange(1, 13), rtol=1e-6)


def test_missing_lead_error() -> None:
    """A model lead absent from the input is rejected with reason missing_leads, naming it."""
    names = [n for n in MIMIC_ORDER if n != "V4"] + ["X"]
    with pytest.raises(EcgRejected, match="V4") as info:
        prepare_ecg(constant_leads(MIMIC_ORDER), 100, names)
    assert info.value.reason == "missing_leads"
    assert isinstance(info.value, InputError)


def test_duplicate_lead_error() -> None:
    """Two inputs resolving to one model lead are ambiguous: reason duplicate_leads."""
    names = [*MIMIC_ORDER, "lead I"]
    signal = np.concatenate([constant_leads(MIMIC_ORDER), np.zeros((1000, 1))], axis=1)
    with pytest.raises(EcgRejected) as info:
        prepare_ecg(signal, 100, names)
    assert info.value.reason == "duplicate_leads"


def test_nan_interpolation() -> None:
    """§2.2: missing samples are linearly interpolated per lead; the edges take the nearest valid sample."""
    ramp = np.linspace(-1.0, 1.0, 1000)
    signal = np.repeat(ramp[:, None], 12, axis=1)
    signal[100:200, 0] = np.nan
    signal[:10, 1] = np.nan
    signal[990:, 2] = np.inf
    out = prepare_ecg(signal, 100, MIMIC_ORDER)
    np.testing.assert_allclose(out[:, 0], ramp, atol=1e-6)  # interior gap: the line is restored
    np.testing.assert_allclose(out[:10, 1], ramp[10], atol=1e-6)
    np.testing.assert_allclose(out[990:, MODEL_LEADS.index("III")], ramp[989], atol=1e-6)


def test_all_nan_lead_error() -> None:
    """A lead without a single finite sample cannot be interpolated: reason non_finite."""
    signal = constant_leads(MIMIC_ORDER)
    signal[:, MIMIC_ORDER.index("aVF")] = np.nan
    with pytest.raises(EcgRejected, match="aVF") as info:
        prepare_ecg(signal, 100, MIMIC_ORDER)
    assert info.value.reason == "non_finite"


def test_clip_to_3_mv() -> None:
    """§2.2: amplitudes are clipped to ±3 mV (clip_amp=3)."""
    signal = np.zeros((1000, 12))
    signal[10, :] = 5.0
    signal[20, :] = -7.5
    signal[30, :] = 2.9
    out = prepare_ecg(signal, 100, MIMIC_ORDER)
    assert out[10].tolist() == [3.0] * 12 and out[20].tolist() == [-3.0] * 12
    np.testing.assert_allclose(out[30], 2.9, rtol=1e-6)


@pytest.mark.parametrize("fs", [500.0, 250.0, 1000.0, 360.0])
def test_resampling_sine_keeps_frequency_and_amplitude(fs: float) -> None:
    """§2.2: resampling to 100 Hz keeps a 5 Hz, 1 mV sine's frequency and amplitude (500, 250, 1000, 360 Hz in)."""
    out = prepare_ecg(sine(fs, 5.0), fs, MIMIC_ORDER)
    t = np.arange(1000) / 100.0
    ideal = np.sin(2 * np.pi * 5.0 * t)
    np.testing.assert_allclose(
        out[50:950, 0], ideal[50:950], atol=0.01
    )  # away from the filter's edge transients
    spectrum = np.abs(np.fft.rfft(out[:, 0]))
    assert np.argmax(spectrum) * TARGET_FS / 1000 == 5.0
    assert out[50:950, 0].max() == pytest.approx(1.0, abs=0.01)


def test_crop_to_first_10_seconds() -> None:
    """A recording longer than 10 s contributes its first 10 s."""
    signal = np.repeat((np.arange(1500) / 1500.0)[:, None], 12, axis=1)
    out = prepare_ecg(signal, 100, MIMIC_ORDER)
    np.testing.assert_allclose(out[:, 0], np.arange(1000) / 1500.0, rtol=1e-6)


def test_short_recording_edge_padded_to_10_seconds() -> None:
    """Between 2.5 s and 10 s the recording is edge-padded to 10 s (its last sample repeated)."""
    signal = np.repeat(np.linspace(0, 1, 500)[:, None], 12, axis=1)
    out = prepare_ecg(signal, 100, MIMIC_ORDER)
    np.testing.assert_allclose(out[:500, 0], np.linspace(0, 1, 500), rtol=1e-6)
    assert (out[500:, 0] == out[499, 0]).all()
    assert prepare_ecg(signal[:250], 100, MIMIC_ORDER).shape == (1000, 12)  # exactly 2.5 s is enough


def test_too_short_error() -> None:
    """Shorter than one 2.5 s model window is rejected: reason too_short."""
    with pytest.raises(EcgRejected) as info:
        prepare_ecg(sine(500.0, 5.0, seconds=2.4), 500.0, MIMIC_ORDER)
    assert info.value.reason == "too_short"


@pytest.mark.parametrize(
    ("signal", "fs", "names", "reason"),
    [
        (np.zeros(1000), 100.0, MIMIC_ORDER, "bad_shape"),
        (np.zeros((1000, 11)), 100.0, MIMIC_ORDER, "bad_shape"),
        (np.zeros((0, 12)), 100.0, MIMIC_ORDER, "bad_shape"),
        (np.zeros((1000, 12)), 0.0, MIMIC_ORDER, "bad_fs"),
        (np.zeros((1000, 12)), float("nan"), MIMIC_ORDER, "bad_fs"),
    ],
)
def test_malformed_input_errors(signal: np.ndarray, fs: float, names: list[str], reason: str) -> None:
    """Wrong shape or sampling rate is reported with a named reason, never a numpy traceback."""
    with pytest.raises(EcgRejected) as info:
        prepare_ecg(signal, fs, names)
    assert info.value.reason == reason


def test_batch_path_identical_to_single() -> None:
    """The batched 500 → 100 Hz path used by preprocess gives bit-identical output to prepare_ecg."""
    rng = np.random.default_rng(0)
    batch = rng.normal(scale=1.5, size=(5, 5000, 12))
    batch[2, 100:140, 3] = np.nan
    together = prepare_ecg_batch(batch, 500, MIMIC_ORDER)
    singles = np.stack([prepare_ecg(record, 500, MIMIC_ORDER) for record in batch])
    assert together.dtype == np.float32
    np.testing.assert_array_equal(together, singles)


@pytest.mark.parametrize("fs", [0.001, 10.0, 49.9, 20_001.0, float("nan"), -500.0])
def test_implausible_sampling_rates_are_rejected_before_resampling(fs: float) -> None:
    """A rate outside 50 Hz–20 kHz is refused (a tiny one would make the resampler allocate GBs)."""
    signal = np.zeros((1000, 12), dtype=np.float32)
    with pytest.raises(EcgRejected) as exc:
        prepare_ecg(signal, fs, MODEL_LEADS)
    assert exc.value.reason == "bad_fs"


def test_prepare_is_bit_identical_to_the_reference_maths() -> None:
    """Training input is pinned: select by name, interpolate, clip ±3 mV, resample_poly, first 10 s, float32.

    Written out here step by step, so any change to the preparation (which would silently change
    every preprocessed training record) fails this test.
    """
    rng = np.random.default_rng(3)
    signal = rng.normal(scale=1.5, size=(6000, 12))
    signal[100:130, MIMIC_ORDER.index("V3")] = np.nan
    columns = [MIMIC_ORDER.index(lead) for lead in MODEL_LEADS]
    expected = signal[:, columns].astype(np.float64)
    t = np.arange(expected.shape[0])
    v3 = MODEL_LEADS.index("V3")
    bad = ~np.isfinite(expected[:, v3])
    expected[bad, v3] = np.interp(t[bad], t[~bad], expected[~bad, v3])
    np.clip(expected, -3.0, 3.0, out=expected)
    ratio = Fraction(100, 500)
    expected = resample_poly(expected, ratio.numerator, ratio.denominator, axis=0)[:1000]
    np.testing.assert_array_equal(prepare_ecg(signal, 500, MIMIC_ORDER), expected.astype(np.float32))
    np.testing.assert_array_equal(
        prepare_ecg_batch(signal[np.newaxis], 500, MIMIC_ORDER)[0], expected.astype(np.float32)
    )


# --------------------------------------------------------------------------- inverted, foreign and derived leads


@pytest.mark.parametrize(
    "name",
    ["-aVR", "\u2212aVR", "Lead -aVR", "aVR-inverted", "aVR inverted", "negative aVR", "MDC_ECG_LEAD_AVRneg"],
)
def test_inverted_avr_resolves_to_avr_with_sign_minus_one(name: str) -> None:
    """Cabrera's -aVR, in its real-world spellings, is aVR inverted: LeadMatch("aVR", -1.0)."""
    assert canonical_lead(name) == LeadMatch("aVR", -1.0)


def test_inverted_avr_is_handled_identically_everywhere() -> None:
    """A '-aVR' column holding −x gives exactly what an 'aVR' column holding x gives: in the training
    batch path, in prepare_ecg, in the record canonicalisation, and with ecg.yaml's aliases."""
    rng = np.random.default_rng(4)
    upright = rng.normal(scale=0.5, size=(5000, 12))
    inverted = upright.copy()
    inverted[:, MIMIC_ORDER.index("aVR")] *= -1.0
    names = [("-aVR" if n == "aVR" else n) for n in MIMIC_ORDER]
    aliases = load_mappings().ecg.lead_aliases
    reference = prepare_ecg(upright, 500, MIMIC_ORDER)
    np.testing.assert_array_equal(prepare_ecg(inverted, 500, names), reference)
    np.testing.assert_array_equal(prepare_ecg(inverted, 500, names, aliases), reference)
    np.testing.assert_array_equal(prepare_ecg_batch(inverted[np.newaxis], 500, names)[0], reference)
    record = to_model_leads(EcgRecording(inverted.astype(np.float32), 500.0, tuple(names)), aliases)
    expected = to_model_leads(EcgRecording(upright.astype(np.float32), 500.0, tuple(MIMIC_ORDER)))
    np.testing.assert_array_equal(record.signal, expected.signal)
    assert any("aVR taken inverted" in note for note in record.warnings)


def test_upright_lead_wins_over_an_inverted_copy() -> None:
    """A file with both aVR and -aVR: the recorded aVR is used; two upright copies are ambiguous."""
    plan = plan_leads([*MIMIC_ORDER, "-aVR"])
    assert plan.columns[MODEL_LEADS.index("aVR")] == MIMIC_ORDER.index("aVR")
    assert plan.signs == (1.0,) * 12
    plan = plan_leads(["-aVR", *MIMIC_ORDER])
    assert plan.columns[MODEL_LEADS.index("aVR")] == 1 + MIMIC_ORDER.index("aVR")
    no_avr = [n for n in MIMIC_ORDER if n != "aVR"]
    for names in ([*no_avr, "-aVR", "aVR inverted"], [*MIMIC_ORDER, "Lead aVR"]):
        with pytest.raises(EcgRejected) as info:
            plan_leads(names)
        assert info.value.reason == "duplicate_leads"


@pytest.mark.parametrize("name", ["V4R", "V3R", "Lead V4R", "v4-r", "V7", "V8", "V9", "MDC_ECG_LEAD_V4R"])
def test_right_sided_and_posterior_leads_never_become_v1_to_v6(name: str) -> None:
    """V3R, V4R, V7–V9 are other electrodes: never a model lead, not even through an alias."""
    assert canonical_lead(name) is None
    assert canonical_lead(name, {"V4": [name], "V3": [name], "V5": [name]}) is None


def test_right_sided_lead_does_not_fill_a_missing_v4() -> None:
    """A file with V4R instead of V4 lacks V4: missing_leads names V4 and lists what the file has."""
    names = [("V4R" if n == "V4" else n) for n in MIMIC_ORDER]
    with pytest.raises(EcgRejected) as info:
        prepare_ecg(constant_leads(MIMIC_ORDER), 100, names)
    assert info.value.reason == "missing_leads"
    assert "lacks lead(s) V4 " in str(info.value) and "V4R" in str(info.value)


def _with_derived_limb_leads(eight: np.ndarray) -> np.ndarray:
    """(T, 12) in model order: the 8 measured leads plus III, aVR, aVL, aVF by Einthoven/Goldberger."""
    one, two = eight[:, 0], eight[:, 1]
    derived = [two - one, -0.5 * one + -0.5 * two, one - 0.5 * two, two - 0.5 * one]
    return np.column_stack([eight, *derived])


def test_eight_lead_record_derives_limb_leads_exactly() -> None:
    """I, II, V1–V6 only: III = II − I, aVR = −(I+II)/2, aVL = I − II/2, aVF = II − I/2, bit-exactly,
    in the record canonicalisation and in the prepared model input."""
    assert LIMB_WEIGHTS == {
        "III": {"I": -1.0, "II": 1.0},
        "aVR": {"I": -0.5, "II": -0.5},
        "aVL": {"I": 1.0, "II": -0.5},
        "aVF": {"I": -0.5, "II": 1.0},
    }
    rng = np.random.default_rng(5)
    eight = rng.normal(scale=0.5, size=(5000, 8))
    names = MODEL_LEADS[:8]
    full = _with_derived_limb_leads(eight)
    np.testing.assert_array_equal(prepare_ecg(eight, 500, names), prepare_ecg(full, 500, MODEL_LEADS))
    record = to_model_leads(EcgRecording(eight.astype(np.float32), 500.0, names))
    assert record.lead_names == MODEL_LEADS
    expected = _with_derived_limb_leads(eight.astype(np.float32).astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(record.signal, expected)


def test_recorded_limb_leads_are_kept_not_derived() -> None:
    """A limb lead the file holds is used as recorded, even when it disagrees with I and II."""
    signal = constant_leads(MIMIC_ORDER)
    out = prepare_ecg(signal, 100, MIMIC_ORDER)
    np.testing.assert_allclose(out[0, MODEL_LEADS.index("III")], 0.9, rtol=1e-6)  # not II − I = 0.1
    assert plan_leads(MIMIC_ORDER).derived == ()
