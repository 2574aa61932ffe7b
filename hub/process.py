"""The process-wide settings modelhub makes, all here: torch's thread pool and Inductor's cache.

Everything else belongs to a Server (its plugins, models, batchers, metrics registry). These
two cannot: torch has one intra-op thread pool per process, and Inductor reads its cache
directory and compile-thread count from the environment of the process. `configure` is called
by `Server.start` and at the start of `modelhub build`; the scripts that build in-process call
it too. No target or runtime sets them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Inductor's cache under the model repository, unless TORCHINDUCTOR_CACHE_DIR says otherwise.
INDUCTOR_CACHE = ".inductor"


def configure(threads: int, model_repository: Path | None = None) -> None:
    """Set torch's intra-op threads to `threads`, and (when not set already, by the user or an
    earlier server in this process) TORCHINDUCTOR_CACHE_DIR to <model_repository>/.inductor and
    TORCHINDUCTOR_COMPILE_THREADS to `threads`. Idempotent."""
    if model_repository is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((model_repository / INDUCTOR_CACHE).resolve()))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, threads)))
    set_torch_threads(threads)


def set_torch_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
