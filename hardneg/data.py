"""Datasets: the built-in scikit-learn digits, a user's ImageFolder, or plain tensors.

Every dataset here is an :class:`ImageDataset`: float images ``(N, C, H, W)`` in ``[0, 1]``,
int64 labels, class names, and ``__getitem__`` returning ``(image, label, index)`` so a training
loop always knows the stable sample id the engine keys its embedding bank by.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

Regime = Literal["balanced", "long-tail", "few-shot"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset was malformed: wrong shapes or dtypes, labels out of range, an empty class."""


@dataclass
class ImageDataset(Dataset):
    """Images held in memory with labels and class names; items are ``(image, label, index)``."""

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        self.images, self.labels = validate_images_and_labels(self.images, self.labels, len(self.class_names))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.images[index], self.labels[index], int(index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> list[int]:
        """Number of samples per class, in class order."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: Sequence[int] | Tensor) -> "ImageDataset":
        """A new dataset of the given rows (ids are renumbered from 0)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx], self.labels[idx], list(self.class_names))


def validate_images_and_labels(images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Check shapes, dtypes, finiteness and label range; return (float images, int64 labels)."""
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels)
    if images.ndim != 4:
        raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise DataError(f"images must be a float tensor (values in [0, 1]), got dtype {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"labels must be (N,) with N = {images.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"labels must be integers, got dtype {labels.dtype}")
    if not torch.isfinite(images).all():
        raise DataError("images contain NaN or infinite values")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), got min {labels.min()} max {labels.max()}")
    return images.float(), labels


def from_tensors(images: Tensor, labels: Tensor, class_names: Optional[Sequence[str]] = None) -> ImageDataset:
    """Wrap user tensors; class names default to ``"0".."K-1"`` with K = max label + 1."""
    labels = torch.as_tensor(labels)
    if class_names is None:
        k = int(labels.max()) + 1 if labels.numel() else 0
        class_names = [str(i) for i in range(k)]
    return ImageDataset(torch.as_tensor(images), labels, list(class_names))


def load_digits(
    size: int = 32,
    test_fraction: float = 0.25,
    seed: int = 0,
    regime: Regime = "balanced",
    imbalance_ratio: float = 20.0,
    shots: int = 10,
) -> tuple[ImageDataset, ImageDataset]:
    """scikit-learn's 8x8 handwritten digits, resized to ``size`` px, split into (train, test).

    ``regime="long-tail"`` keeps an exponentially decaying number of training samples per class
    (class 0 the head, class 9 the tail, head/tail = ``imbalance_ratio``); ``"few-shot"`` keeps
    ``shots`` samples per class. The test split is always balanced and untouched.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    names = [str(i) for i in range(10)]
    g = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for c in range(10):
        idx = np.flatnonzero(bunch.target == c)
        g.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test_idx += idx[:n_test].tolist()
        train_idx += idx[n_test:].tolist()
    train_idx_t = torch.tensor(sorted(train_idx))
    train = ImageDataset(x[train_idx_t], y[train_idx_t], names)
    test = ImageDataset(x[torch.tensor(sorted(test_idx))], y[torch.tensor(sorted(test_idx))], names)
    if regime == "long-tail":
        train = long_tail_subset(train, imbalance_ratio, seed)
    elif regime == "few-shot":
        train = few_shot_subset(train, shots, seed)
    elif regime != "balanced":
        raise DataError(f"regime must be 'balanced', 'long-tail' or 'few-shot', got {regime!r}")
    return train, test


def long_tail_subset(data: ImageDataset, imbalance_ratio: float, seed: int = 0,
                     max_per_class: Optional[int] = None) -> ImageDataset:
    """Keep n_c = n_max * (1 / ratio)^(c / (K-1)) samples of class c (class 0 the head).

    The CIFAR-10-LT construction of Cao et al. 2019 (LDAM). ``n_max`` is ``max_per_class`` when
    given (it must not exceed the smallest class), else the smallest class's count.
    """
    if imbalance_ratio < 1:
        raise DataError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    counts = data.class_counts()
    k = data.num_classes
    n_max = min(counts)
    if max_per_class is not None:
        if max_per_class < 1:
            raise DataError(f"max_per_class must be >= 1, got {max_per_class}")
        if max_per_class > n_max:
            raise DataError(f"max_per_class={max_per_class} but the smallest class has only {n_max} samples")
        n_max = int(max_per_class)
    g = np.random.default_rng(seed)
    keep: list[int] = []
    for c in range(k):
        n_c = max(1, int(round(n_max * imbalance_ratio ** (-c / max(k - 1, 1)))))
        idx = (data.labels == c).nonzero().flatten().numpy()
        keep += g.choice(idx, size=min(n_c, len(idx)), replace=False).tolist()
    return data.subset(sorted(keep))


def few_shot_subset(data: ImageDataset, shots: int, seed: int = 0) -> ImageDataset:
    """Keep ``shots`` samples of every class."""
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    g = np.random.default_rng(seed)
    keep: list[int] = []
    for c in range(data.num_classes):
        idx = (data.labels == c).nonzero().flatten().numpy()
        if len(idx) == 0:
            raise DataError(f"class {data.class_names[c]!r} has no samples")
        keep += g.choice(idx, size=min(shots, len(idx)), replace=False).tolist()
    return data.subset(sorted(keep))


def load_image_folder(path: str, size: int = 32, channels: int = 3) -> ImageDataset:
    """Read ``path/<class name>/<image>`` into memory, resized to ``size`` px, in ``[0, 1]``."""
    from PIL import Image

    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if not os.path.isdir(path):
        raise DataError(f"image folder {path!r} does not exist or is not a directory")
    class_names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not class_names:
        raise DataError(f"{path!r} holds no class sub-folders; expected {path}/<class>/<image>.png")
    images: list[Tensor] = []
    labels: list[int] = []
    mode = "L" if channels == 1 else "RGB"
    for c, name in enumerate(class_names):
        files = sorted(f for f in os.listdir(os.path.join(path, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"class folder {os.path.join(path, name)!r} holds no images")
        for f in files:
            with Image.open(os.path.join(path, name, f)) as im:
                im = im.convert(mode).resize((size, size), Image.BILINEAR)
                arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
            images.append(arr.unsqueeze(0) if channels == 1 else arr.permute(2, 0, 1))
            labels.append(c)
    return ImageDataset(torch.stack(images), torch.tensor(labels), class_names)


def stratified_split(data: ImageDataset, test_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[ImageDataset, ImageDataset]:
    """Split ``data`` into (train, test) with ``test_fraction`` of every class held out (seeded)."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    g = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for c in range(data.num_classes):
        idx = (data.labels == c).nonzero().flatten().numpy()
        if len(idx) < 2:
            raise DataError(f"class {data.class_names[c]!r} has {len(idx)} sample(s): a hold-out split needs >= 2")
        g.shuffle(idx)
        n_test = min(len(idx) - 1, max(1, int(round(len(idx) * test_fraction))))
        test_idx += idx[:n_test].tolist()
        train_idx += idx[n_test:].tolist()
    return data.subset(sorted(train_idx)), data.subset(sorted(test_idx))


def load_train_test_folder(path: str, size: int = 32, channels: int = 3, seed: int = 0,
                           test_fraction: float = 0.2) -> tuple[ImageDataset, ImageDataset]:
    """A user's image data as (train, test).

    ``path/train/<class>/*`` and ``path/test/<class>/*`` are read as given (the class folders must
    match); a plain ``path/<class>/*`` folder is split by :func:`stratified_split`.
    """
    tr_dir, te_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if os.path.isdir(tr_dir) and os.path.isdir(te_dir):
        train = load_image_folder(tr_dir, size=size, channels=channels)
        test = load_image_folder(te_dir, size=size, channels=channels)
        if train.class_names != test.class_names:
            raise DataError(f"{tr_dir!r} and {te_dir!r} hold different class folders: "
                            f"{train.class_names} vs {test.class_names}")
        return train, test
    return stratified_split(load_image_folder(path, size=size, channels=channels), test_fraction, seed)


def load_data(spec: str, size: int = 32, channels: Optional[int] = None, seed: int = 0,
              regime: Regime = "balanced") -> tuple[ImageDataset, Optional[ImageDataset]]:
    """``"digits"`` -> the built-in (train, test); a folder path -> (ImageFolder, None)."""
    if spec == "digits":
        return load_digits(size=size, seed=seed, regime=regime)
    return load_image_folder(spec, size=size, channels=channels or 3), None


def save_image_folder(images: Tensor, labels: Sequence[int], class_names: Sequence[str], out_dir: str,
                      prefix: str = "img") -> list[str]:
    """Write images (values in [0, 1]) as PNGs under ``out_dir/<class name>/``; return the paths."""
    from PIL import Image

    paths = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = os.path.join(out_dir, class_names[int(lab)])
        os.makedirs(d, exist_ok=True)
        arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
        p = os.path.join(d, f"{prefix}_{i:06d}.png")
        pil.save(p)
        paths.append(p)
    return paths


def detect_channels(path: str, per_class: int = 8) -> int:
    """1 when the first images of every class of an image folder (``path/<class>/*`` or
    ``path/train/<class>/*``) are grayscale, else 3; a folder without images gives 3 (the loader
    then says what is missing)."""
    from PIL import Image

    root = os.path.join(path, "train") if os.path.isdir(os.path.join(path, "train")) else path
    seen = 0
    for cls in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))[:per_class]
        for f in files:
            with Image.open(os.path.join(folder, f)) as im:
                if im.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return 3
            seen += 1
    return 1 if seen else 3
