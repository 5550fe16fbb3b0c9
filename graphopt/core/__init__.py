"""Core machinery every layer stands on: the model, proto edits, files, errors, onnxruntime sessions and latency,
numeric comparison, calibration inputs, streamed activation capture, tensor shapes and conv geometry.

May import: the standard library, onnx, onnxruntime, numpy (and modules of core). Nothing above it.
"""
