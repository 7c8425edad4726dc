"""Deprecated path of `cai_lib.platform.pyfunc_model`, kept because model versions registered
before the layered layout name it as their MLmodel's `loader_module`."""

import warnings

from cai_lib.platform.pyfunc_model import _load_pyfunc  # noqa: F401 - MLflow's pyfunc entry point

warnings.warn(
    "cai_lib.pyfunc_model moved to cai_lib.platform.pyfunc_model; versions registered from now on name "
    "the new path",
    DeprecationWarning,
    stacklevel=2,
)
