"""Error types. Every user-facing failure is a VitcError: one line, names the file/pass/node, says what to do.

The bottom layer: every part of vitc (compiler/, passes/, runtimes/, tools/) may import it, and it imports
nothing of vitc (tests/test_layering.py). ``vitc.compiler.errors`` re-exports these names."""

from __future__ import annotations


class VitcError(Exception):
    """A failure the user can act on. The CLI prints ``str(err)`` as one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}; {hint}")


class ModelLoadError(VitcError):
    """The input model cannot be read, is not ONNX, or is not supported."""


class CalibrationDataError(VitcError):
    """Calibration inputs are missing, malformed or non-finite."""


class OutputError(VitcError):
    """The output location cannot be written or already exists."""


class PolicyError(VitcError):
    """A policy file or preset is invalid."""


class PassError(VitcError):
    """A graph pass failed; the message names the pass and node."""

    exit_code = 3

    def __init__(self, pass_name: str, message: str, *, node: str | None = None, hint: str | None = None):
        where = f"pass {pass_name}" + (f", node {node!r}" if node else "")
        super().__init__(f"{where}: {message}", hint=hint)
        self.pass_name = pass_name
        self.node = node


class RuntimeUnavailableError(VitcError):
    """A runtime (TensorRT, CUDA) is not installed or no device is present."""

    exit_code = 4


__all__ = ["VitcError", "ModelLoadError", "CalibrationDataError", "OutputError", "PolicyError", "PassError",
           "RuntimeUnavailableError"]
