"""Checkpoint files: written atomically, loaded without running code.

Two rules, for every state file the project writes or reads:

- **Atomic writes** (:func:`save_atomic`): the bytes go to a temporary file in the same folder,
  are flushed and ``fsync``-ed, and only then replace the target with ``os.replace``. A process
  killed mid-write (SIGKILL, power loss) leaves the previous checkpoint intact, never a truncated
  or empty one; at worst a stray ``.<name>.*.tmp`` file is left beside it.
- **Safe loads** (:func:`load_safe`): ``torch.load(weights_only=True)``, which unpickles only
  tensors, numbers, strings and the plain containers holding them. A crafted checkpoint whose
  pickle would import and call arbitrary code is refused instead of executed. Every way a file
  can be unusable (missing, empty, truncated, not a torch file, unsafe, missing keys) raises one
  :class:`CheckpointError` naming the file and what is wrong with it.

Keep saved state plain (tensors, numbers, strings, lists, dicts) so it loads under these rules.

Serves ``save``/``load`` of the engine (:mod:`hardneg.persistence`), the demo's and the CLI's checkpoints.
"""

from __future__ import annotations

import os
import pickle
import secrets
import warnings
import zipfile
from typing import Any, Iterable, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["CheckpointError", "fsync_dir", "save_atomic", "load_safe"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, empty, truncated, corrupt, unsafe or incomplete.

    Attributes:
        path: the file.
        problem: what is wrong with it (one sentence, with how to fix it where there is a fix).
    """

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` always holds a complete file.

    Writes a temporary file in the same folder (same filesystem, so the rename is atomic),
    ``fsync``-s it, ``os.replace``-s it over ``path`` and ``fsync``-s the folder (POSIX) so the
    rename itself survives a crash. On any error the temporary file is removed and ``path`` is
    left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 (not mkstemp's 0o600): the checkpoint gets the permissions torch.save would give it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def _load_mapped(path: str, map_location: Any) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it (torch's zip
    format): a large embedding bank's vectors are then read from disk as they are used, not copied
    into RAM first. An older (non-zip) file loads the usual way."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (RuntimeError, ValueError) as exc:
        if "mmap" not in str(exc) and "zipfile" not in str(exc).lower():
            raise
    return torch.load(path, map_location=map_location, weights_only=True)


def load_safe(path: PathLike, what: str = "checkpoint", keys: Iterable[str] = (),
              map_location: Any = "cpu") -> Any:
    """Load a file written by :func:`save_atomic` (or ``torch.save``) without executing code.

    Args:
        path: the file.
        what: what the file should be, for the error message (e.g. ``"hardneg engine state"``).
        keys: keys the loaded object must have (it must then be a dict).
        map_location: passed to ``torch.load`` (default: everything on the CPU).

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, holds objects other
            than tensors/numbers/strings and plain containers (refused, never executed), or lacks
            one of ``keys``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, f"no such file (expected a {what})")
    if os.path.isdir(path):
        raise CheckpointError(path, f"is a folder, expected a {what} file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, f"is empty (0 bytes), likely left by an interrupted write: not a {what}; "
                                    "resume from an earlier checkpoint or start afresh")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = _load_mapped(path, map_location)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "GLOBAL" in msg or "Unsupported global" in msg:  # a class or function to import: refuse
            raise CheckpointError(
                path, f"refused to load: it holds Python objects other than tensors, numbers and strings, whose "
                      f"unpickling could run arbitrary code ({_reason(msg)}). A {what} written by hardneg never "
                      "holds such objects; if you made this file yourself and trust it, load it with torch.load("
                      "weights_only=False) and save plain tensors instead") from None
        raise CheckpointError(path, f"is truncated, corrupt or not a torch file ({_reason(msg)}); expected a {what}"
                              ) from None
    except PermissionError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror}); check its permissions") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            AttributeError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            path, f"is truncated, corrupt or not a torch file ({type(exc).__name__}: {_reason(str(exc))}); "
                  f"expected a {what}") from None
    keys = list(keys)
    if keys:
        if not isinstance(obj, dict):
            raise CheckpointError(path, f"holds a {type(obj).__name__}, expected a {what} (a dict with keys {keys})")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise CheckpointError(path, f"lacks {missing}: not a {what} (it has keys {sorted(map(str, obj))[:10]})")
    return obj


def _reason(msg: str, limit: int = 200) -> str:
    """The informative line of a torch error (not its boilerplate about weights_only defaults)."""
    lines = [s.strip() for s in msg.splitlines() if s.strip()]
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue")
    useful = [s for s in lines if not s.startswith(boiler)]
    line = (useful or lines or [""])[0]
    if line.endswith("WeightsUnpickler error:") and len(useful) > 1:
        line = useful[1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def fsync_dir(folder: Union[str, "os.PathLike[str]"]) -> None:
    """Persist a rename in ``folder`` (POSIX); a no-op where folders cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

