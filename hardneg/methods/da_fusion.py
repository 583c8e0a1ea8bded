"""DA-Fusion (Trabucco et al., "Effective Data Augmentation With Diffusion Models"): same-class
diffusion augmentation, the main baseline hardneg's targeted hard negatives must beat.

A real image of class c is noised to strength ``t0`` and denoised conditioned on the *same* class,
so the label is kept; during training a real image is replaced by one of its synthetic versions
with probability ``p`` (0.5 in the paper), strength ``t0 = 0.5`` or drawn from
{0.25, 0.5, 0.75, 1.0}.

In hardneg this is just a configuration of the same engine: the ``"same-class"`` targeting policy
(:class:`hardneg.targeting.SameClassTargeting`) plans pairs ``(c, c)`` round-robin over the classes
with random bank samples of c as sources and a fixed (or sampled) r, and ``mix_mode="substitute"``
replaces real rows by synthetic ones. Training events used: ``mix`` and ``observe`` (the engine's).

**Approximation.** DA-Fusion flips a coin per real image and substitutes *that* image's own
synthetic version. hardneg substitutes the last ``round(p * N)`` rows of every batch of N by
synthetic images drawn from the buffer (any source, any class the policy has visited), so the
expected share of synthetic rows per batch is the same ``p`` but it does not vary from batch to
batch, and the synthetic rows are not tied to the real rows they replace. The buffer holds
about ``buffer_size`` synthetic images, each used at most ``max_uses`` times before it is evicted
first, instead of a fixed ``M = 10`` versions per real image.
"""

from __future__ import annotations

from typing import Any, Optional

from hardneg.config import HardNegConfig
from hardneg.targeting import DA_FUSION_STRENGTHS

__all__ = ["DA_FUSION_STRENGTHS", "da_fusion_config"]


def da_fusion_config(num_classes: int, p: float = 0.5, strength: Optional[float] = 0.5, **kw: Any) -> HardNegConfig:
    """A :class:`HardNegConfig` that runs the engine as DA-Fusion (same-class augmentation).

    Args:
        num_classes: classes of the task.
        p: share of each batch replaced by synthetic same-class images (``synthetic_fraction``);
            must lie in ``[0, 1)``.
        strength: the img2img strength t0 (GeNIe's r) of every synthetic image, or ``None`` to draw
            it per image from {0.25, 0.5, 0.75, 1.0} as the paper's randomised variant does.
        **kw: any other :class:`HardNegConfig` field (``generator``, ``refresh_every``, ...).

    Returns a validated config with ``targeting="same-class"``, ``mix_mode="substitute"``,
    ``synthetic_fraction=p`` and ``curriculum="constant"`` (the policy fixes r per image, so no
    schedule moves it; ``r_start`` is set to the fixed strength for the engine's statistics).
    """
    if strength is not None and not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must lie in (0, 1] or be None (sampled), got {strength!r}")
    for name in ("targeting", "mix_mode", "synthetic_fraction", "curriculum", "label_mode", "same_class_strength"):
        if name in kw:
            raise ValueError(f"da_fusion_config sets {name} itself; pass p=/strength= instead")
    if strength is not None:
        kw.setdefault("r_start", float(strength))
    return HardNegConfig(
        num_classes=num_classes,
        targeting="same-class",
        mix_mode="substitute",
        synthetic_fraction=float(p),
        curriculum="constant",
        label_mode="hard",  # same-class: the label is the image's own class, whatever r
        same_class_strength=strength,
        **kw,
    )
