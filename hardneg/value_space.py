"""The training pipeline's value space and the generator's, and the maps between them.

A training pipeline usually normalises its images per channel, ``x = (pixels - mean) / std``
(timm's transforms, torchvision ``Normalize``, Hugging Face image processors), while a generator
works on plain pixels in a fixed range (``[0, 1]`` by default, see
:mod:`hardneg.generators.base`). The engine fetches GeNIe sources from the user's dataset, so it
must undo the normalisation before generating and redo it before the generated images are
mixed into a batch; otherwise the classifier trains on two pixel scales at once, silently.

:class:`ValueSpace` holds that pair of spaces (``HardNegConfig.data_mean`` / ``data_std`` /
``pixel_range``); :func:`normalization_from` reads mean and std from the objects that already
know them, so they need not be typed twice::

    cfg = HardNegConfig(num_classes=10, **normalization_from(timm.data.resolve_data_config({}, model=model)))

Serves the refresh (sources leave the pipeline's space, :mod:`hardneg.requests`) and arrival
(generated images come back into it); options: :class:`ValueSpaceOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ValueSpace", "ValueSpaceError", "normalization_from"]

# Slack (as a share of the pixel range) before a source counts as outside the generator's range:
# float round trips and interpolation overshoot stay well inside it, a wrong scale (normalised or
# 0..255 images) does not.
RANGE_TOLERANCE = 0.05


class ValueSpaceError(ValueError):
    """Images are not in the value range the engine was told to expect."""


@dataclass(frozen=True)
class ValueSpace:
    """Pipeline space (what the dataset and ``mix`` hold) vs the generator's pixel space.

    Args:
        mean: per-channel mean of the pipeline's normalisation, or ``None`` (no normalisation:
            the pipeline holds plain pixels).
        std: per-channel standard deviation (same length as ``mean``).
        pixel_range: ``(low, high)`` of un-normalised pixels, the range the generator works in.
    """

    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    pixel_range: tuple[float, float] = (0.0, 1.0)

    @property
    def normalised(self) -> bool:
        """Whether the pipeline normalises (mean/std given)."""
        return self.mean is not None

    def to_pixels(self, images: Tensor, ids: Optional[Sequence[int]] = None) -> Tensor:
        """Pipeline-space ``(N, C, H, W)`` images -> the generator's pixels, clamped to ``pixel_range``.

        Raises :class:`ValueSpaceError` when an image lies clearly outside ``pixel_range`` once
        un-normalised: the engine's idea of the pipeline does not match the data.
        """
        x = images.float()
        if self.normalised:
            mean, std = self._stats(x)
            x = x * std + mean
        lo, hi = self.pixel_range
        slack = RANGE_TOLERANCE * (hi - lo)
        if x.numel():
            per_image_min = x.flatten(1).min(1).values
            per_image_max = x.flatten(1).max(1).values
            bad = ((per_image_min < lo - slack) | (per_image_max > hi + slack)).nonzero().flatten().tolist()
            if bad:
                raise ValueSpaceError(self._range_message(x, bad, ids))
        return x.clamp(lo, hi)

    def from_pixels(self, images: Tensor) -> Tensor:
        """Generator pixels -> pipeline space (normalised with mean/std when the pipeline is)."""
        x = images.float()
        if not self.normalised:
            return x
        mean, std = self._stats(x)
        return (x - mean) / std

    # ------------------------------------------------------------------ internals
    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.mean is not None and self.std is not None
        c = x.shape[1] if x.ndim == 4 else None
        if c != len(self.mean):
            raise ValueSpaceError(
                f"images have {c} channel(s) but data_mean/data_std have {len(self.mean)}: give one "
                "mean and std per channel of the training images")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def _range_message(self, x: Tensor, bad: list[int], ids: Optional[Sequence[int]]) -> str:
        which = [int(ids[i]) for i in bad[:5]] if ids is not None else bad[:5]
        got = f"[{float(x[bad].min()):.3g}, {float(x[bad].max()):.3g}]"
        lo, hi = self.pixel_range
        if self.normalised:
            return (
                f"source image(s) of sample id(s) {which} lie in {got} after undoing the normalisation "
                f"(mean {list(self.mean or ())}, std {list(self.std or ())}), outside the generator's pixel "
                f"range [{lo:g}, {hi:g}]: data_mean/data_std must be the ones your pipeline normalises with "
                "(hardneg.normalization_from(your transform / timm data config / image processor)), and "
                "pixel_range the range of the images before normalising")
        return (
            f"source image(s) of sample id(s) {which} lie in {got}, outside the generator's pixel range "
            f"[{lo:g}, {hi:g}]. If your pipeline normalises its images, tell the engine how: "
            "HardNegConfig(..., **hardneg.normalization_from(transform_or_data_config_or_processor)) or "
            "data_mean=/data_std=; if your images simply use another range, set pixel_range=(low, high) "
            "(and give the generator the same range)")


def normalization_from(source: Any) -> dict[str, tuple[float, ...]]:
    """``{"data_mean": ..., "data_std": ...}`` read from what knows the pipeline's normalisation.

    Accepts a timm data config (``timm.data.resolve_data_config(...)``: a dict with ``mean`` and
    ``std``), a Hugging Face image processor (``image_mean`` / ``image_std``), a torchvision
    ``Normalize`` (``mean`` / ``std``) or a transform pipeline holding one (``Compose`` and
    anything with a ``transforms`` list, searched in order; what timm's ``create_transform``
    returns), a timm ``PrefetchLoader`` (which keeps them in 0..255 units; scaled back to
    ``[0, 1]`` here) or a ``(mean, std)`` pair. Pass the result to :class:`HardNegConfig`.
    """
    found = _find_normalization(source, depth=0)
    if found is None:
        raise ValueSpaceError(
            f"found no mean/std in a {type(source).__name__}: pass a timm data config (dict with 'mean' and "
            "'std'), an image processor (image_mean/image_std), a Normalize transform or a Compose holding one, "
            "or give HardNegConfig(data_mean=..., data_std=...) directly")
    mean, std = found
    if len(mean) != len(std) or not mean:
        raise ValueSpaceError(f"mean and std must have one value per channel, got {mean} and {std}")
    return {"data_mean": mean, "data_std": std}


def _floats(value: Any) -> Optional[tuple[float, ...]]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.detach().flatten().cpu().tolist()
    if isinstance(value, (int, float)):
        return (float(value),)
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _find_normalization(source: Any, depth: int) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    if depth > 4 or source is None:
        return None
    if isinstance(source, Mapping):
        pairs = (("mean", "std"), ("image_mean", "image_std"))
        for km, ks in pairs:
            if km in source and ks in source:
                mean, std = _floats(source[km]), _floats(source[ks])
                return (mean, std) if mean is not None and std is not None else None
        return None
    if isinstance(source, (tuple, list)) and len(source) == 2:
        mean, std = _floats(source[0]), _floats(source[1])
        if mean is not None and std is not None:
            return mean, std
    for km, ks in (("image_mean", "image_std"), ("mean", "std")):
        mean, std = _floats(getattr(source, km, None)), _floats(getattr(source, ks, None))
        if mean is not None and std is not None:
            if type(source).__name__ == "PrefetchLoader":  # timm: stats kept in 0..255 units
                mean, std = tuple(m / 255.0 for m in mean), tuple(s / 255.0 for s in std)
            return mean, std
    transforms = getattr(source, "transforms", None)
    if isinstance(transforms, (list, tuple)):
        for t in transforms:
            found = _find_normalization(t, depth + 1)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class ValueSpaceOptions:
    """How the pipeline normalises its pixels (``HardNegConfig`` fields of the same names;
    ``value_space_options``): ``(x - data_mean) / data_std`` per channel (None: plain pixels), the
    generator working on plain pixels in ``pixel_range``."""

    data_mean: Optional[tuple[float, ...]] = None
    data_std: Optional[tuple[float, ...]] = None
    pixel_range: tuple[float, float] = (0.0, 1.0)  # un-normalised pixels (the generator's space)

    def __post_init__(self) -> None:
        from hardneg._checks import ConfigError, set_field

        for name in ("data_mean", "data_std"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a sequence of numbers (one per channel), got {value!r}") from None
            if not values or any(v != v or v in (float("inf"), float("-inf")) for v in values):
                raise ConfigError(f"{name} must hold one finite number per channel, got {value!r}")
            set_field(self, name, values)
        mean, std = self.data_mean, self.data_std
        if (mean is None) != (std is None):
            raise ConfigError("data_mean and data_std go together: give both (the pipeline's normalisation) or "
                              "neither (plain pixels)")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ConfigError(f"data_mean has {len(mean)} channel(s) but data_std has {len(std)}")
            if any(v <= 0 for v in std):
                raise ConfigError(f"data_std must be positive, got {std}")
        pr = self.pixel_range
        if (not isinstance(pr, (tuple, list)) or len(pr) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pr) or not pr[0] < pr[1]):
            raise ConfigError(f"pixel_range must be (low, high) with low < high, got {pr!r}")
        set_field(self, "pixel_range", (float(pr[0]), float(pr[1])))

    def make(self) -> ValueSpace:
        return ValueSpace(self.data_mean, self.data_std, self.pixel_range)
