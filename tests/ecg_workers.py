"""The function ECG decoder workers run in the tests: :func:`decode`, or a misbehaviour on request.

It lives in a module of its own because worker processes import it by name
(:class:`cds_service.ecg.isolation.Decoder` pickles a reference to it), and test modules never
import each other. The job's ``hint`` selects the misbehaviour: ``stall`` burns CPU forever,
``crash`` ends the process, ``raise`` raises an unexpected exception, ``where`` reports the
process it ran in (as an :class:`EcgRejected` message); anything else decodes normally.
"""

from __future__ import annotations

import os

from cds_service.ecg.isolation import DecodeJob, decode
from cds_service.ecg.record import EcgRecording, EcgRejected


def work(job: DecodeJob) -> EcgRecording:
    """The workers' function: :func:`decode`, or the misbehaviour ``job.hint`` names."""
    if job.hint == "stall":
        while True:  # a decoder stuck in CPU work; only killing the process ends it
            pass
    if job.hint == "crash":
        os._exit(3)
    if job.hint == "raise":
        raise ZeroDivisionError("bug")
    if job.hint == "where":
        raise EcgRejected("unreadable", f"decoded in process {os.getpid()}")
    return decode(job)
