"""Write a 12-lead recording in the carrier formats the service reads (DICOM, WFDB zip, MUSE XML,
FHIR ``valueSampledData``).

The counterparts of the readers in :mod:`cds_service.ecg.readers`: ``ecglab seed-fhir`` uploads
synthetic ECGs in every format the service accepts, and the round-trip tests check that what is
written here reads back unchanged. They live with the training tools, not the service: the
service only ever reads ECGs. Each writer takes integer samples (T, C) and the scale that turns
them into voltage, so payloads are small and exact. pydicom and wfdb are imported lazily.
"""

from __future__ import annotations

import base64
import io
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers.dicom import DICOM_LEAD_CODES

__all__ = ["encode_dicom", "encode_muse_xml", "encode_sampled_data", "encode_wfdb_zip"]


def encode_sampled_data(digital: npt.ArrayLike, uv_per_unit: float, fs: float) -> list[dict[str, Any]]:
    """``valueSampledData`` dicts (origin 0 µV) for integer samples (T, C): one per column.

    The writer counterpart of :mod:`cds_service.ecg.readers.sampled_data` (without the component
    ``code``, which the caller adds).
    """
    arr = np.asarray(digital)
    return [
        {
            "origin": {"value": 0, "unit": "µV", "system": "http://unitsofmeasure.org", "code": "uV"},
            "period": round(1000.0 / fs, 6),
            "factor": uv_per_unit,
            "dimensions": 1,
            "data": " ".join(str(int(v)) for v in arr[:, c]),
        }
        for c in range(arr.shape[1])
    ]


def encode_dicom(
    digital: npt.ArrayLike, uv_per_unit: float, fs: float, lead_names: Sequence[str], *, acquired: str
) -> bytes:
    """A minimal DICOM General ECG Waveform file for int16 samples (T, C) at ``uv_per_unit`` µV.

    ``acquired`` is the DICOM DateTime (``YYYYMMDDHHMMSS``). Patient attributes are left empty:
    the FHIR resource that carries the file names the patient.

    Raises:
        ValueError: when the samples do not match the lead names.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(digital)
    if arr.ndim != 2 or arr.shape[1] != len(lead_names):
        raise ValueError(f"samples {arr.shape} do not match {len(lead_names)} lead names")
    codes = {lead: code for code, lead in DICOM_LEAD_CODES.items() if code.startswith("2:")}
    sop_class = UID("1.2.840.10008.5.1.4.1.1.9.1.2")  # General ECG Waveform Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "ECG"
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AcquisitionDateTime = acquired
    ds.ContentDate, ds.ContentTime = acquired[:8], acquired[8:14]
    group = Dataset()
    group.MultiplexGroupLabel = "RHYTHM"
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = arr.shape[1]
    group.NumberOfWaveformSamples = arr.shape[0]
    group.SamplingFrequency = f"{fs:g}"
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    channels = []
    for name in lead_names:
        source = Dataset()
        source.CodeValue = codes.get(name, "")
        source.CodingSchemeDesignator = "MDC"
        source.CodeMeaning = f"Lead {name}"
        unit = Dataset()
        unit.CodeValue = "uV"
        unit.CodingSchemeDesignator = "UCUM"
        unit.CodeMeaning = "microvolt"
        channel = Dataset()
        channel.ChannelSourceSequence = [source]
        channel.ChannelSensitivity = "1"
        channel.ChannelSensitivityUnitsSequence = [unit]
        channel.ChannelSensitivityCorrectionFactor = f"{uv_per_unit:g}"
        channel.ChannelBaseline = "0"
        channel.ChannelSampleSkew = "0"
        channel.WaveformBitsStored = 16
        channels.append(channel)
    group.ChannelDefinitionSequence = channels
    group.WaveformData = np.ascontiguousarray(arr, dtype="<i2").tobytes()
    ds.WaveformSequence = [group]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def encode_wfdb_zip(
    digital: npt.ArrayLike, adc_gain: float, fs: float, lead_names: Sequence[str], record_name: str
) -> bytes:
    """A zip holding a WFDB format-16 record of int16 samples (T, C) at ``adc_gain`` units per mV."""
    import wfdb

    arr = np.asarray(digital, dtype=np.int16)
    n_leads = arr.shape[1]
    with tempfile.TemporaryDirectory(prefix="ecglab-wfdb-") as tmp:
        wfdb.wrsamp(
            record_name,
            fs=fs,
            units=["mV"] * n_leads,
            sig_name=list(lead_names),
            d_signal=arr.astype(np.int32),
            fmt=["16"] * n_leads,
            adc_gain=[adc_gain] * n_leads,
            baseline=[0] * n_leads,
            write_dir=tmp,
        )
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for suffix in (".hea", ".dat"):
                archive.write(Path(tmp) / f"{record_name}{suffix}", f"{record_name}{suffix}")
    return out.getvalue()


def encode_muse_xml(digital: npt.ArrayLike, uv_per_bit: float, fs: float, lead_names: Sequence[str]) -> bytes:
    """A minimal MUSE ``RestingECG`` document with one Rhythm waveform of int16 samples (T, C)."""
    arr = np.asarray(digital, dtype="<i2")
    root = ElementTree.Element("RestingECG")
    waveform = ElementTree.SubElement(root, "Waveform")
    for tag, text in (("WaveformType", "Rhythm"), ("SampleBase", f"{fs:g}"), ("SampleExponent", "0")):
        ElementTree.SubElement(waveform, tag).text = text
    ElementTree.SubElement(waveform, "NumberofLeads").text = str(arr.shape[1])
    for c, name in enumerate(lead_names):
        lead = ElementTree.SubElement(waveform, "LeadData")
        for tag, text in (
            ("LeadSampleCountTotal", str(arr.shape[0])),
            ("LeadAmplitudeUnitsPerBit", f"{uv_per_bit:g}"),
            ("LeadAmplitudeUnits", "MICROVOLTS"),
            ("LeadID", name),
            ("LeadSampleSize", "2"),
            ("WaveFormData", base64.b64encode(np.ascontiguousarray(arr[:, c]).tobytes()).decode("ascii")),
        ):
            ElementTree.SubElement(lead, tag).text = text
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
