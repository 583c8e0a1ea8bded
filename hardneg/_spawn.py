"""Catch the classic ``spawn`` mistake before it kills the generation child.

``backend="process"`` starts its child with ``multiprocessing``'s ``spawn`` method, which imports
the parent's main script again in the child (as ``__mp_main__``). A script that builds the
engine / worker at module level, outside ``if __name__ == "__main__":``, therefore builds another
worker inside the child while it is still bootstrapping, and the child dies with Python's
"An attempt has been made to start a new process before the current process has finished its
bootstrapping phase" ``RuntimeError`` (the parent only sees a dead worker). :func:`check_spawn_safe`
finds that case in the parent, before anything is spawned, and in the child, and raises
:class:`SpawnGuardError` naming the fix.
"""

from __future__ import annotations

import ast
import multiprocessing
import sys
from types import FrameType
from typing import Optional

__all__ = ["SpawnGuardError", "check_spawn_safe"]

FIX = ('put the training code under `if __name__ == "__main__":` (e.g. `def main(): ...` then '
       '`if __name__ == "__main__": main()`), or use worker_backend="thread"')


class SpawnGuardError(RuntimeError):
    """A process worker would be started from unguarded module-level code of the main script."""


def check_spawn_safe() -> None:
    """Raise :class:`SpawnGuardError` when starting a ``spawn`` child from here would fail.

    In a child still importing the main script (``multiprocessing``'s bootstrapping phase), and in
    the parent when the call comes from the main script's module-level code outside an
    ``if __name__ == "__main__":`` block (read from the script's source; a script that cannot be
    read is not checked).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SpawnGuardError(
            "a process worker is being started inside the generation child while it imports the training "
            "script: spawn re-runs the script's module-level code in the child. To fix it, " + FIX)
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return  # interactive / notebook: spawn does not re-run anything
    spec_name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if spec_name == "__main__" or spec_name.endswith(".__main__"):
        return  # ``python -m package``: spawn never re-runs a package's __main__ in the child
    frame = _main_module_frame(sys._getframe(1), main.__dict__)
    if frame is None:
        return  # not called from the main script's top level (e.g. pytest, a library entry point)
    line = frame.f_lineno
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return
    if not _inside_main_guard(tree, line):
        raise SpawnGuardError(
            f"worker_backend='process' starts its child with spawn, which re-runs the training script's "
            f"module-level code in the child; {path}:{line} starts the worker at module level, outside "
            f"`if __name__ == \"__main__\":`, so the child would start another one and die with "
            f"multiprocessing's bootstrapping RuntimeError. To fix it, {FIX}.")


def _main_module_frame(frame: Optional[FrameType], main_globals: dict) -> Optional[FrameType]:
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is main_globals:
            return frame
        frame = frame.f_back
    return None


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either side), also as one operand of an ``and``."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return any(_is_main_test(v) for v in test.values)
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    has_name = any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
    has_main = any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
    return has_name and has_main


def _inside_main_guard(tree: ast.Module, line: int) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_test(node.test):
            body_start = node.body[0].lineno if node.body else node.lineno
            body_end = max(getattr(n, "end_lineno", n.lineno) or n.lineno for n in node.body) if node.body else 0
            if body_start <= line <= body_end:
                return True
    return False
