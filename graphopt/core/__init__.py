"""Core machinery every layer stands on: the model, proto edits, files, errors, onnxruntime sessions and latency,
numeric comparison, calibration inputs, streamed activation capture, tensor shapes, conv geometry, and the torch
executor (torch_exec: an ONNX graph run in torch with named parameters, for recovery).

May import: the standard library, onnx, onnxruntime, numpy (and modules of core); torch only in torch_exec, which
nothing imports at module level (torch is an optional extra). Nothing above it.
"""
