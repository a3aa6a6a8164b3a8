"""One path from ECG bytes to model input.

* :mod:`.record` — the one recording type every reader returns, the one error type
  (:class:`~cds_service.ecg.record.EcgRejected`) and its reason codes, and read limits;
* :mod:`.readers` — one module per file format and the registry that detects the format from the
  content (FHIR ``valueSampledData`` in :mod:`.readers.sampled_data`);
* :mod:`.canonical` — lead names → the model's 12 leads (aliases, inverted leads, derived limb
  leads, completeness);
* :mod:`.prepare` — the signal maths shared with training (interpolate, clip, resample, 10 s);
* :mod:`.select` — which ECG of the patient's FHIR resources is used;
* :mod:`.isolation` — decoding in a bounded process pool, abandoned at the call's deadline.

Nothing is imported here, so importing one step does not load the others.
"""
