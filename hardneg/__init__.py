"""hardneg: online, confusion-targeted GeNIe hard negatives for image classifiers.

``from hardneg import HardNeg, HardNegConfig`` is the whole entry point; heavier modules
(FAISS, the engine) load on first use, and optional extras (diffusers, lightning,
transformers, accelerate) only when their feature is used.
"""

from __future__ import annotations

from typing import Any

from hardneg.config import ConfigError, HardNegConfig

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "HardNeg", "HardNegConfig", "HardNegError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("HardNeg", "HardNegError"):
        from hardneg import plugin

        return getattr(plugin, name)
    if name == "CheckpointError":
        from hardneg.checkpoint import CheckpointError

        return CheckpointError
    raise AttributeError(f"module 'hardneg' has no attribute {name!r}")
