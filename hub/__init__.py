"""modelhub: a plugin-based model hub and Triton-compatible inference server.

Plugin authors need only what this module exports:

    from hub import hookimpl, ModelSpec, TensorSpec, BatchPolicy
"""

from hub.errors import TargetUnavailable
from hub.plugins.hookspecs import hookimpl
from hub.spec import ArtifactContext, BatchPolicy, ModelSpec, Runtime, Target, TensorSpec, Tolerance

__version__ = "0.1.0"

__all__ = [
    "ArtifactContext",
    "BatchPolicy",
    "ModelSpec",
    "Runtime",
    "Target",
    "TargetUnavailable",
    "TensorSpec",
    "Tolerance",
    "__version__",
    "hookimpl",
]
