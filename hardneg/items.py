"""Reading a user's dataset items: the image and the label of item ``i`` (sample id ``i``).

Serves the refresh event (the engine fetches GeNIe source images by sample id,
:mod:`hardneg.requests`) and :meth:`hardneg.HardNeg.refresh_bank` (re-embedding a dataset). An item
is an ``(image, label, ...)`` tuple, a dict (Hugging Face style) or a bare image tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hardneg.validation import HardNegError

__all__ = ["item_image", "item_label"]


def item_image(item: Any) -> Tensor:
    """The image of a dataset item: ``(image, label, ...)``, a dict (``image``/``pixel_values``/``x``/``input``)
    or a bare image tensor."""
    if isinstance(item, dict):
        for key in ("image", "pixel_values", "x", "input"):
            if key in item:
                return torch.as_tensor(item[key])
        raise HardNegError(f"dataset item dict has no image key (tried image/pixel_values/x/input): {list(item)}")
    if isinstance(item, (tuple, list)):
        return torch.as_tensor(item[0])
    return torch.as_tensor(item)


def item_label(item: Any) -> int:
    """The class id of a dataset item: its second element, or a dict's ``label``/``labels``/``y``/``target``."""
    if isinstance(item, dict):
        for key in ("label", "labels", "y", "target"):
            if key in item:
                return int(item[key])
        raise HardNegError(f"dataset item dict has no label key: {list(item)}")
    return int(item[1])
