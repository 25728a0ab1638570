"""Error types: kept importable from here; they live in :mod:`vitc.errors` (a root module, so that passes/ and
runtimes/ can raise them without importing the compiler)."""

from vitc.errors import *  # noqa: F401,F403
from vitc.errors import (CalibrationDataError, ModelLoadError, OutputError, PassError, PolicyError,
                         RuntimeUnavailableError, VitcError)

__all__ = ["VitcError", "ModelLoadError", "CalibrationDataError", "OutputError", "PolicyError", "PassError",
           "RuntimeUnavailableError"]
