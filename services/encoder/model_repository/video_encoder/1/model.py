"""Triton python backend entry point: the logic is modalink.triton.TritonPythonModel (shared with PyTriton)."""

from modalink.triton import TritonPythonModel  # noqa: F401
