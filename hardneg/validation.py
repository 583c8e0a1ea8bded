"""Checks of what a training loop hands the engine, before any state changes.

Serves the ``mix`` and ``observe`` events: :class:`hardneg.HardNeg` calls these pure functions
first, so a bad batch (wrong shapes or dtypes, NaN/inf, labels outside the classes, ids that do not
match the mixed batch) raises :class:`HardNegError` saying what was wrong and how to fix it, with
nothing recorded (docs/reliability.md lists every case).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

import torch
from torch import Tensor

from hardneg.observer import any_bad, finite_array, finite_sum, labels_outside, numpy_ok

__all__ = ["HardNegError", "as_tensor", "check_mix_shape", "check_observation", "check_observation_values",
           "labels_as_ids", "validate_mix_input", "validate_observation", "validate_synthetic_pairs"]


class HardNegError(ValueError):
    """Bad input to the engine (shapes, NaN embeddings, labels, missing ids or dataset)."""


def labels_as_ids(labels: Any, emb: Any, last_mix: Any,
                  synthetic_pairs: Optional[Sequence[tuple[int, int]]]) -> Any:
    """Class ids from ``(N, K)`` soft targets (what :meth:`mix` returns with soft labels): real
    rows their argmax, synthetic rows their target class; anything else is returned as is.
    ``last_mix`` is the record of the mix that made the batch. Stays on the labels' device (no host read)."""
    if isinstance(labels, Tensor) and labels.ndim != 2:
        return labels  # class ids already (the usual case: checked by check_observation)
    m = last_mix
    known = getattr(m, "label_ids", None)
    if known is not None and synthetic_pairs is None and labels is m.y and getattr(emb, "shape", (None,))[0] == m.n_total:
        return known  # the soft targets the mix made from class ids: their ids, kept by the mix (no argmax)
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return labels  # validate_observation says what is wrong with it
    if y.ndim != 2 or not y.is_floating_point():
        return labels
    ids = y.detach().argmax(1)
    if synthetic_pairs is not None:
        pairs, n_real = list(synthetic_pairs), ids.shape[0] - len(synthetic_pairs)
    elif m is not None and ids.shape[0] == m.n_total and getattr(emb, "shape", (None,))[0] == m.n_total:
        pairs, n_real = m.synthetic_pairs, m.n_real
    else:
        pairs, n_real = [], ids.shape[0]
    if pairs and n_real >= 0:
        targets = torch.tensor([int(b) for _, b in pairs], dtype=ids.dtype)
        ids = torch.cat([ids[:n_real], targets.to(ids.device, non_blocking=True)])
    return ids


def validate_observation(
    emb: Tensor, labels: Any, logits: Optional[Tensor], ids: Any, num_classes: int
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """``(embeddings, labels, logits, ids)`` of one ``observe`` checked and detached (labels and ids
    int64, where they were); raises :class:`HardNegError` before anything is recorded: the shapes
    and dtypes (:func:`check_observation`), then the values (:func:`check_observation_values`)."""
    emb, labels, logits, ids_t = check_observation(emb, labels, logits, ids, num_classes)
    check_observation_values(emb, labels, logits, ids_t, num_classes)
    return emb, labels, logits, ids_t


def check_observation(
    emb: Tensor, labels: Any, logits: Optional[Tensor], ids: Any, num_classes: int
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """The shape and dtype half of :func:`validate_observation` (metadata only, no values read):
    the four tensors detached, labels and ids as int64."""
    k = num_classes
    if not isinstance(emb, Tensor) or emb.ndim != 2:
        raise HardNegError(f"embeddings must be a (N, D) tensor, got {getattr(emb, 'shape', type(emb))}")
    if not emb.is_floating_point():
        raise HardNegError(f"embeddings must be floating point, got dtype {emb.dtype}")
    if not isinstance(labels, Tensor):
        labels = as_tensor(labels, "labels", "integer class ids (N,)")
    if labels.dtype == torch.bool:
        raise HardNegError("labels are bool: pass integer class ids (e.g. y.long() for a 0/1 target), so a "
                           "mask or a True/False target is never taken for classes 0 and 1 by accident")
    if labels.is_floating_point() or labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise HardNegError(f"labels must be integer (N,) with N={emb.shape[0]}, got {labels.dtype} {tuple(labels.shape)}")
    labels = _detached_long(labels)
    if emb.requires_grad:
        emb = emb.detach()
    if logits is not None:
        if logits.requires_grad:
            logits = logits.detach()
        if logits.ndim != 2 or logits.shape != (emb.shape[0], k):
            raise HardNegError(f"logits must have shape ({emb.shape[0]}, {k}), got {tuple(logits.shape)}")
    ids_t = ids if isinstance(ids, Tensor) else as_tensor(ids, "ids", "integer dataset indices (N,)")
    if ids_t.is_floating_point() or ids_t.dtype == torch.bool or ids_t.ndim != 1:
        raise HardNegError(f"ids must be an integer (N,) tensor of sample ids, got {ids_t.dtype} {tuple(ids_t.shape)}")
    return emb, labels, logits, _detached_long(ids_t)


def _detached_long(t: Tensor) -> Tensor:
    """``t.detach().long()``, skipping either step where it changes nothing (an int64 tensor outside
    any graph is returned as it is)."""
    if t.requires_grad:
        t = t.detach()
    return t if t.dtype == torch.int64 else t.long()


def check_observation_values(emb: Tensor, labels: Tensor, logits: Optional[Tensor], ids: Tensor, num_classes: int,
                             arrays: Optional[Mapping[str, np.ndarray]] = None) -> None:
    """The value half of :func:`validate_observation` on tensors :func:`check_observation` passed:
    embeddings and logits finite, labels in ``[0, num_classes)``, ids >= 0; raises
    :class:`HardNegError` saying which.

    One fused flag per device, read back once; the exact checks (and their messages) run only when
    it is set. CPU tensors are checked by numpy on the calling thread (no torch op, no OpenMP team),
    on ``arrays`` when it holds all four (by name: ``emb``, ``labels``, ``logits`` unless None,
    ``ids``): numpy views of private copies of the same tensors, just written and so in the cache
    (``observe`` checks the copies it hands to its background thread, :attr:`Staged.arrays`).
    """
    k = num_classes
    if arrays is not None and len(arrays) == 3 + (logits is not None):
        bad = _cpu_values_bad(arrays["emb"], arrays["labels"], arrays.get("logits"), arrays["ids"], k)
    elif numpy_ok(emb) and numpy_ok(labels) and (logits is None or numpy_ok(logits)) and numpy_ok(ids):
        bad = _cpu_values_bad(emb.numpy(), labels.numpy(), None if logits is None else logits.numpy(), ids.numpy(), k)
    else:
        flags = [finite_sum(emb)] + ([finite_sum(logits)] if logits is not None else [])
        if labels.numel():
            lo, hi = torch.aminmax(labels)
            flags.append((lo < 0) | (hi >= k))
        if ids.numel():
            flags.append((ids < 0).any())
        bad = any_bad(flags)
    if bad:
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise HardNegError(f"labels must lie in [0, {k}), got min {int(labels.min())} max {int(labels.max())}")
        if not torch.isfinite(emb).all():
            raise HardNegError(
                "embeddings contain NaN/inf (the model has probably diverged); nothing was recorded for this step"
            )
        if logits is not None and not torch.isfinite(logits).all():
            raise HardNegError("logits contain NaN/inf; nothing was recorded for this step")
        if ids.numel() and int(ids.min()) < 0:
            raise HardNegError(f"ids must be dataset indices >= 0, got min {int(ids.min())}")


def _cpu_values_bad(emb: np.ndarray, labels: np.ndarray, logits: Optional[np.ndarray], ids: np.ndarray,
                    k: int) -> bool:
    """The value checks of :func:`validate_observation` on numpy views of CPU tensors: whether an
    embedding or logit sum is not finite, a label is outside ``[0, k)`` or an id is negative."""
    if not finite_array(emb):
        return True
    if logits is not None and not finite_array(logits):
        return True
    if labels_outside(labels, k):
        return True
    return bool(ids.size and ids.min() < 0)


def validate_synthetic_pairs(synthetic_pairs: Any, n_rows: int, num_classes: int) -> list[tuple[int, int]]:
    """``observe(synthetic_pairs=...)`` as ``(source class, target class)`` ints within the classes."""
    k = num_classes
    try:
        pairs = [(int(a), int(b)) for a, b in synthetic_pairs]
    except (TypeError, ValueError):
        raise HardNegError("synthetic_pairs must be a sequence of (source class, target class) integer pairs, "
                           f"got {synthetic_pairs!r:.200}") from None
    if len(pairs) > n_rows:
        raise HardNegError(f"synthetic_pairs has {len(pairs)} pairs but the batch has only {n_rows} rows: it "
                           "describes the LAST rows of the batch, so it cannot be longer than the batch")
    bad = [p for p in pairs if not (0 <= p[0] < k and 0 <= p[1] < k)]
    if bad:
        raise HardNegError(f"synthetic_pairs holds classes outside [0, {k}): {bad[:5]}")
    return pairs


def validate_mix_input(x: Any, y: Any, num_classes: int) -> None:
    """Everything about ``mix``'s arguments that can be checked before the engine changes state."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise HardNegError(f"mix() needs tensors x and y, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim < 1 or y.ndim not in (1, 2) or x.shape[0] != y.shape[0]:
        raise HardNegError(
            f"mix() needs x (N, ...) and y (N,) labels or (N, K) soft targets, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}")
    if not x.is_floating_point():
        raise HardNegError(
            f"mix() needs floating-point images (generated rows are float, in the value range of the training "
            f"data), got {x.dtype}: convert the batch first, e.g. x.float() / 255 for uint8 images, and train "
            "the generator on the same range")
    if y.dtype == torch.bool or (y.ndim == 2 and not y.is_floating_point()):
        raise HardNegError(f"mix() needs y as integer class ids (N,) or float soft targets (N, K), got {y.dtype} "
                           f"{tuple(y.shape)}")
    if y.ndim == 2 and y.shape[1] != num_classes:
        raise HardNegError(f"soft targets y have {y.shape[1]} classes, config.num_classes is "
                           f"{num_classes}")


def check_mix_shape(x: Tensor, shape: Optional[tuple[int, ...]]) -> None:
    """The batch's per-sample shape must be the generated images' ``shape`` (None: no image yet)."""
    if shape is not None and tuple(x.shape[1:]) != shape:
        hint = ""
        if x.ndim == 4 and len(shape) == 3 and x.shape[1] != shape[0]:
            hint = f" (channels: generator {shape[0]}, batch {x.shape[1]})"
        raise HardNegError(
            f"the batch has per-sample shape {tuple(x.shape[1:])} but the generated images are {shape}{hint}: "
            "the generator must produce images like the training data (same channels and size)")


def as_tensor(value: Any, name: str, expected: str) -> Tensor:
    """``torch.as_tensor`` with an error naming the argument (strings, ragged lists, objects)."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        first = next(iter(value), None) if isinstance(value, (list, tuple)) else value
        raise HardNegError(f"{name} must be {expected}, got a {type(value).__name__} of "
                           f"{type(first).__name__} ({value!r:.80}); map them to integers first") from None
