"""The KServe v2 / Open Inference Protocol wire helpers, sans-I/O.

gRPC: a ``ModelInferRequest`` read and a ``ModelInferResponse`` written without protobuf
(:func:`read_infer_request` answers None for a message it leaves to protobuf).
REST: the number arrays of a JSON body read straight into numpy, without Python numbers
(:func:`split_numeric_arrays`, then :func:`parse_numbers` for each placeholder).
"""

from mip.protocol._jsonnum import PLACEHOLDER, parse_numbers, split_numeric_arrays
from mip.protocol._oip import read_infer_request, write_infer_reply

__all__ = ["PLACEHOLDER", "parse_numbers", "read_infer_request", "split_numeric_arrays",
           "write_infer_reply"]
