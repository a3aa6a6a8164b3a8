"""ecglab CDS Hooks service: FHIR in, ONNX model, lab-test recommendation cards out.

This package never imports torch: it must run in the slim ``serve`` install.
"""

__version__ = "0.1.0"
