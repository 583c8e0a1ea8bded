"""accuracy: does hardneg make a classifier better than what a practitioner already does?

Data: the built-in digits (``--data digits``) or any image folder (``--data PATH`` with
``train/<class>/*`` and ``test/<class>/*``, or one ``<class>/*`` folder split by a seeded,
stratified hold-out), 1 or 3 channels. Regimes built from the training split: ``balanced``,
``long-tail`` (Cao et al. 2019: n_c = n_max * (1/imbalance)^(c/(K-1)), ``--imbalance``,
``--max-per-class``) and ``few-shot`` (``--shots``); the test split is never touched.

**Every method is "base + X"**: base is the augmentation a practitioner already uses for that
data (natural images: random crop with padding + horizontal flip; digits: small shifts and
rotations, no flips), plus one row without any augmentation. With an engine the base
augmentation applies to the real rows only (:func:`hardneg.training.train`). Every method trains
for the same steps with the same model, optimiser and schedule, and every generating method
gets the same number of generated images (``--budget``, a share of the training-set size).
Engine methods request their images at ``--refreshes`` fixed steps over the first 60% of
training; ``--deterministic`` waits for each refresh's images, so every requested image arrives
and a seed repeats exactly.

Statistics: ``--seeds`` are paired (same seed = same initial weights, data order and split for
every method). Reported: mean +- std, and per method the mean paired difference to base with a
95% t-interval (:mod:`hardneg.benchmarks._stats`); a difference is a gain or loss only when its
interval excludes 0. Metrics: overall, tail-class (long-tail: the rarest half), few-class
(classes with < 20 training images) and confused-pair accuracy (the pairs base confuses most,
fixed before the comparison from base runs with the separate ``--pair-seeds``).

Label quality: a judge (:class:`hardneg.judge.JudgeNet`) trained on the **full** real training
split (more data than any classifier here sees: a diagnostic, not a method) labels every
generated image; the table says what share it reads as the label the image was given, as its
source class, or as something else, and how confident the classifier was in the given label when
the image arrived (engine methods: difficulty at arrival).

Runs are cached one JSON per (regime, method, seed) under ``OUT/runs`` with a fingerprint of the
settings, so an interrupted table resumes where it stopped and methods can be added later.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from benchmarks import _common as C
from benchmarks import _stats as S

NAME = "accuracy"
HELP = "base + X on digits or an image folder: paired seeds, 95% intervals, label quality of generated images"

REGIMES = ("balanced", "long-tail", "few-shot")
FEW_CLASS_LIMIT = 20  # a class with fewer training images than this is a "few" class
FUSION_RATIO = 0.3  # refinement r of the CAM-fusion mode
DIFF_MIX_STRENGTHS = (0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Method:
    """One row of the table: how it trains and what it generates."""

    label: str
    kind: str = "plain"  # plain | mixup | offline-genie | diff-mix | auggen | engine
    augment: bool = True  # base augmentation on the real rows
    engine: dict[str, Any] = field(default_factory=dict)  # HardNegConfig overrides of an engine method
    regimes: Optional[tuple[str, ...]] = None  # only these regimes (None: all)

    @property
    def generates(self) -> bool:
        return self.kind in ("offline-genie", "diff-mix", "auggen", "engine")


# The hardneg rows share these settings; each variant changes only what its name says.
HARDNEG_COMMON: dict[str, Any] = dict(top_pairs=4, knn_k=10, sources_per_pair=24, synthetic_fraction=0.25)
TEACHER = dict(teacher="ema", teacher_decay=0.99)
# Every engine row keeps an EMA teacher so that each arriving image's difficulty (the classifier's
# and the teacher's P(label) before it is trained on) is recorded; rows that do not use it for
# labels, filtering or the curriculum train exactly as without it (eval-mode forwards only).
ARRIVAL_SCORING = dict(TEACHER)
METHODS: dict[str, Method] = {
    "none": Method("(a) no augmentation", augment=False),
    "base": Method("(b) base (standard augmentation)"),
    "mixup": Method("(c) base + mixup/cutmix", kind="mixup"),
    "da-fusion": Method("(d) base + DA-Fusion (same class, r 0.5, label kept)", kind="engine",
                        engine={"policy": "same-class"}),
    "offline-genie": Method("(e) base + offline GeNIe (random pairs, r 0.8, target label)", kind="offline-genie"),
    "diff-mix": Method("(f) base + Diff-Mix-style (random pairs, s in {.3,.5,.7,.9}, soft s^0.5)", kind="diff-mix"),
    "hardneg": Method("(g) base + hardneg (the engine's default method)", kind="engine", engine={}),
    "hardneg-hard": Method("(h) hardneg: hard target labels, adaptive r (the old default)", kind="engine",
                           engine={"label_mode": "hard", "curriculum": "adaptive"}),
    "hardneg-soft-r": Method("(i) hardneg: soft labels by r (r^0.5)", kind="engine",
                             engine={"label_mode": "soft-r", "curriculum": "adaptive"}),
    "hardneg-teacher": Method("(j) hardneg: soft labels by an EMA teacher", kind="engine",
                              engine={"label_mode": "teacher", "curriculum": "adaptive", **TEACHER}),
    "hardneg-filter": Method("(k) hardneg: hard labels, teacher filter P(target) >= 0.5", kind="engine",
                             engine={"label_mode": "hard", "curriculum": "adaptive", "filter_min_target": 0.5,
                                     **TEACHER}),
    "hardneg-band": Method("(l) hardneg: soft labels by r + band curriculum on teacher P(target) of fresh images",
                           kind="engine", engine={"label_mode": "soft-r", "curriculum": "band", **TEACHER}),
    "hardneg-trust": Method("(m) hardneg: teacher soft labels + filter + band curriculum + budget share",
                            kind="engine",
                            engine={"label_mode": "teacher", "curriculum": "band", "filter_min_target": 0.5,
                                    "min_pair_share": 0.25, **TEACHER}),
    "hardneg-ada": Method("(n) hardneg: GeNIe-Ada r (5 generations per kept image)", kind="engine",
                          engine={"curriculum": "ada"}),
    "hardneg-as-mined": Method("(o) hardneg: pairs as mined (no turn towards the rarer class)", kind="engine",
                               engine={"confusion_direction": "as-mined"}, regimes=("long-tail",)),
    "long-tail": Method("(p) base + long-tail targeting (head -> tail, r 0.7)", kind="engine",
                        engine={"policy": "long-tail"}, regimes=("long-tail",)),
    "long-tail-fusion": Method("(q) base + long-tail targeting + CAM fusion (r 0.3)", kind="engine",
                               engine={"policy": "long-tail-fusion"}, regimes=("long-tail",)),
    "auggen": Method("(r) base + AugGen expansion (mixed classes as new labels)", kind="auggen"),
}
DEFAULT_METHODS = ("none", "base", "mixup", "da-fusion", "offline-genie", "diff-mix", "hardneg", "hardneg-hard",
                   "hardneg-soft-r", "hardneg-teacher", "hardneg-filter", "hardneg-band", "hardneg-trust")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hardneg.commands._args import device  # --device is checked when parsed, as the CLI's commands do

    C.add_common_arguments(p, NAME)
    p.add_argument("--data", default="digits", help="'digits' or an image folder (train/<class>/*, test/<class>/*)")
    p.add_argument("--channels", type=int, default=None, help="channels of an image folder, 1 or 3 (default: 3; digits: 1)")
    p.add_argument("--image-size", type=int, default=None, help="resolution the data is loaded at (default: digits 16, folder 32)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="hold-out share for a folder without test/")
    p.add_argument("--test-per-class", type=int, default=None, help="cap the test set per class (seeded)")
    p.add_argument("--regimes", default="long-tail,few-shot", help=f"comma-separated regimes, of {', '.join(REGIMES)}")
    p.add_argument("--imbalance", type=float, default=None, help="long-tail n_max/n_min (default: digits 20, folder 50)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="long-tail n_max and balanced cap (default: digits all, folder 500)")
    p.add_argument("--shots", type=int, default=None, help="few-shot images per class (default: digits 10, folder 20)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated methods, of {', '.join(METHODS)}")
    p.add_argument("--seeds", default=None, help="paired training seeds (default: 0,1,2,3,4; quick 0)")
    p.add_argument("--pair-seeds", default=None,
                   help="seeds of the base runs that fix the confused pairs before the comparison (default: 100,101)")
    p.add_argument("--curve-steps", default=None,
                   help="step counts of base's convergence curve (runs at each, --pair-seeds), e.g. 100,200,400")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 200 digits, 1200 folder)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 32 digits, 64 folder; quick 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the classifier")
    p.add_argument("--model", default=None, help="timm model (default: digits resnet10t, folder test_resnet)")
    p.add_argument("--budget", type=float, default=0.5, help="generated images as a share of the training-set size")
    p.add_argument("--images", type=int, default=None, help="generated images per run (overrides --budget)")
    p.add_argument("--refreshes", type=int, default=None, help="engine refreshes per run (default: 5; quick 2)")
    p.add_argument("--generator", default="regime",
                   help="class-conditional: 'regime' (fitted on each regime's training split, cached), 'shipped', or "
                        "a folder; stable-diffusion: a hub id or local folder")
    p.add_argument("--generator-backend", choices=["class-conditional", "stable-diffusion"],
                   default="class-conditional", help="stable-diffusion: your own SD weights (--generator ID_OR_PATH)")
    p.add_argument("--device", type=device, default="cpu", help="device of the classifier and the generator (e.g. cuda)")
    p.add_argument("--generator-fit-steps", default=None,
                   help="fit steps, or a list of stages (fidelity after each), e.g. 400,800 (default: 500 digits, 800 "
                        "folder; quick 0)")
    p.add_argument("--generator-size", type=int, default=None,
                   help="the generator's internal resolution (default: the image size up to 16 px on a CPU)")
    p.add_argument("--generator-steps", type=int, default=None, help="DDIM steps of a full schedule (default: 20)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance of the generator (default: its own; SDXL-turbo: 0)")
    p.add_argument("--judge-epochs", type=int, default=None, help="judge training epochs (default: 15 digits, 6 folder)")
    p.add_argument("--long-tail-ratio", type=float, default=0.7, help="r of the long-tail method")
    p.add_argument("--hardneg-r-min", type=float, default=0.3, help="floor of r for the hardneg rows")
    p.add_argument("--diffmix-gamma", type=float, default=0.5, help="Diff-Mix soft label exponent")
    p.add_argument("--auggen-pairs", type=int, default=8, help="class pairs the auggen method mixes (drawn at random)")
    p.add_argument("--auggen-alpha", type=float, default=0.75, help="auggen weight (alpha = beta) of each class embedding in the mixed condition")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads of the training loop")
    p.add_argument("--worker", choices=["process", "thread"], default=None, help="where the generator runs (default: process; quick thread)")
    p.add_argument("--deterministic", action="store_true",
                   help="engine methods wait at each refresh for its images: repeatable runs, every image arrives")
    p.add_argument("--cache-dir", default=None,
                   help="where the read data, the judge and the fitted generators are cached (default: OUT)")
    p.add_argument("--no-resume", action="store_true", help="ignore cached runs under OUT/runs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(bench=NAME)


# ---------------------------------------------------------------------------------- base augmentations
def standard_augment(generator: Any, max_shift: float = 2.0, max_degrees: float = 10.0) -> Any:
    """Digits/letters base: random shifts (up to ``max_shift`` px) and rotations (up to ``max_degrees``)."""
    import torch
    import torch.nn.functional as F

    def transform(x: Any, y: Any) -> tuple[Any, Any]:
        n, _, h, w = x.shape
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, 2 * shift[:, 0] / w
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, 2 * shift[:, 1] / h
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False), y

    return transform


def crop_flip(generator: Any, pad: int = 4) -> Any:
    """Natural-image base: random crop after ``pad`` px reflection padding, and horizontal flip (p 0.5)."""
    import torch

    from hardneg.judge import random_shift

    def transform(x: Any, y: Any) -> tuple[Any, Any]:
        n = x.shape[0]
        out = random_shift(x, pad, generator, mode="reflect")
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
        return out, y

    return transform


def mixup_cutmix(num_classes: int) -> Any:
    """timm's Mixup (batch mode); an odd batch drops its last sample (Mixup needs pairs)."""
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                label_smoothing=0.0, num_classes=num_classes)

    def transform(x: Any, y: Any) -> tuple[Any, Any]:
        if x.shape[0] % 2:
            x, y = x[:-1], y[:-1]
        if x.shape[0] < 2:
            return x, y
        return mix(x.clone(), y)

    return transform


def _compose(*transforms: Any) -> Any:
    def transform(x: Any, y: Any) -> tuple[Any, Any]:
        for t in transforms:
            x, y = t(x, y)
        return x, y

    return transform


# ---------------------------------------------------------------------------------- settings and data
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    q, digits = args.quick, args.data == "digits"
    stages = C.parse_list(args.generator_fit_steps, int) if args.generator_fit_steps is not None else \
        ([0] if q else [500 if digits else 800])
    image_size = args.image_size or (16 if digits else 32)
    s = {
        "data": args.data if digits else os.path.abspath(args.data),
        "channels": 1 if digits else (args.channels or 3), "image_size": image_size,
        "test_fraction": args.test_fraction, "test_per_class": args.test_per_class,
        "regimes": C.parse_list(args.regimes), "methods": C.parse_list(args.methods),
        "imbalance": args.imbalance or (20.0 if digits else 50.0),
        "max_per_class": args.max_per_class if args.max_per_class is not None else (None if digits else 500),
        "shots": args.shots or (10 if digits else 20),
        "seeds": C.parse_list(args.seeds, int) or ([0] if q else [0, 1, 2, 3, 4]),
        "pair_seeds": C.parse_list(args.pair_seeds, int) or ([100] if q else [100, 101]),
        "curve_steps": C.parse_list(args.curve_steps, int) or [],
        "steps": args.steps or (4 if q else (200 if digits else 1200)),
        "batch_size": args.batch_size or (16 if q else (32 if digits else 64)),
        "lr": args.lr, "model": args.model or ("resnet10t" if digits else "test_resnet"),
        "budget": args.budget, "images_override": args.images if args.images else (8 if q else None),
        "refreshes": args.refreshes or (2 if q else 5),
        "generator": args.generator, "generator_fit_stages": stages, "generator_backend": args.generator_backend,
        "device": args.device,
        "generator_size": args.generator_size or min(image_size, 16),
        "generator_steps": args.generator_steps or (4 if q else 20),
        "guidance_scale": args.guidance_scale,
        "judge_epochs": args.judge_epochs or (1 if q else (15 if digits else 6)),
        "long_tail_ratio": args.long_tail_ratio, "hardneg_r_min": args.hardneg_r_min,
        "diffmix_gamma": args.diffmix_gamma, "auggen_pairs": args.auggen_pairs, "auggen_alpha": args.auggen_alpha,
        "train_threads": args.train_threads, "worker": args.worker or ("thread" if q else "process"),
        "deterministic": bool(args.deterministic), "data_seed": 0, "quick": bool(q),
    }
    for m in s["methods"]:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    for r in s["regimes"]:
        if r not in REGIMES:
            raise SystemExit(f"unknown regime {r!r}; known: {', '.join(REGIMES)}")
    if not 0.0 < s["budget"] <= 10.0:
        raise SystemExit(f"--budget must be a share of the training set in (0, 10], got {s['budget']}")
    return s


def _data_key(s: dict[str, Any]) -> str:
    spec = "digits" if s["data"] == "digits" else os.path.basename(s["data"].rstrip("/"))
    raw = json.dumps([s["data"], s["channels"], s["image_size"], s["test_fraction"], s["data_seed"]])
    return f"{spec}-{s['image_size']}px-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"


def _load_full(s: dict[str, Any], out: str) -> tuple[Any, Any]:
    """(full real training split, test split); folders are read once and cached as tensors."""
    from hardneg.checkpoint import save_atomic
    from hardneg.data import ImageDataset, few_shot_subset, load_digits, load_train_test_folder

    if s["data"] == "digits":
        train, test = load_digits(size=s["image_size"], seed=s["data_seed"], regime="balanced")
    else:
        cache = os.path.join(out, "data", _data_key(s) + ".pt")
        d = _read_cache(cache, "dataset cache", ("train_images", "train_labels", "test_images", "test_labels",
                                                 "class_names"))
        if d is not None:
            train = ImageDataset(d["train_images"], d["train_labels"], list(d["class_names"]))
            test = ImageDataset(d["test_images"], d["test_labels"], list(d["class_names"]))
        else:
            print(f"reading {s['data']} ...", flush=True)
            train, test = load_train_test_folder(s["data"], size=s["image_size"], channels=s["channels"],
                                                 seed=s["data_seed"], test_fraction=s["test_fraction"])
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            save_atomic({"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
                         "test_labels": test.labels, "class_names": list(train.class_names)}, cache)
    if s["test_per_class"]:
        test = few_shot_subset(test, s["test_per_class"], s["data_seed"])
    return train, test


def _read_cache(path: str, what: str, keys: tuple[str, ...] = ()) -> Any:
    """A cache file's content (safe load), or None when absent or unreadable (then it is rebuilt)."""
    from hardneg.checkpoint import CheckpointError, load_safe

    if not os.path.exists(path):
        return None
    try:
        return load_safe(path, what=what, keys=keys)
    except CheckpointError as exc:
        print(f"ignoring the {what}, rebuilding it: {exc}", flush=True)
        return None


def _regime_train(full: Any, regime: str, s: dict[str, Any]) -> Any:
    from hardneg.data import few_shot_subset, long_tail_subset

    if regime == "long-tail":
        return long_tail_subset(full, s["imbalance"], s["data_seed"], s["max_per_class"])
    if regime == "few-shot":
        return few_shot_subset(full, s["shots"], s["data_seed"])
    return few_shot_subset(full, s["max_per_class"], s["data_seed"]) if s["max_per_class"] else full


def _images_for(train: Any, s: dict[str, Any]) -> int:
    return int(s["images_override"] or max(1, round(s["budget"] * len(train))))


# ---------------------------------------------------------------------------------- judge and generators
def _judge(s: dict[str, Any], full: Any, test: Any, out: str) -> tuple[Any, dict[str, Any]]:
    """The label-quality judge, trained on the full real training split (cached)."""
    from hardneg.checkpoint import save_atomic
    from hardneg.judge import JudgeNet, judge_accuracy, train_judge

    path = os.path.join(out, "judges", f"{_data_key(s)}-e{s['judge_epochs']}.pt")
    t0 = time.perf_counter()
    cached = _read_cache(path, "judge weights cache") if not s["quick"] else None
    if cached is not None:
        judge = JudgeNet(full.num_classes, full.images.shape[1], full.images.shape[-1])
        judge.load_state_dict(cached)
        judge.eval()
    else:
        print(f"training the judge on the full training split ({len(full)} images, {s['judge_epochs']} epochs)",
              flush=True)
        judge = train_judge(full, epochs=s["judge_epochs"], seed=0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic(judge.state_dict(), path)
    info = {"train_images": len(full), "epochs": s["judge_epochs"], "test_accuracy": judge_accuracy(judge, test),
            "seconds": time.perf_counter() - t0}
    print(f"judge: test accuracy {info['test_accuracy']:.3f} (trained on {len(full)} images)", flush=True)
    return judge, info


def _generator_folder(s: dict[str, Any], regime: str, train: Any, judge: Any, out: str) -> tuple[str, dict[str, Any]]:
    """A class-conditional generator fitted on this regime's training split (cached), with its fidelity."""
    from hardneg.generators.class_conditional import (
        ClassConditionalConfig, ClassConditionalGenerator, default_digits_generator_path,
    )
    from hardneg.judge import class_fidelity

    if s["generator_backend"] == "stable-diffusion":
        if s["generator"] in ("regime", "shipped"):
            raise SystemExit("--generator-backend stable-diffusion needs --generator HUB_ID_OR_FOLDER")
        return s["generator"], {"what": f"Stable Diffusion {s['generator']} (prompts 'a photo of a {{class}}.')"}
    if s["generator"] == "shipped":
        path = default_digits_generator_path()
        return path, {"what": f"shipped digits generator ({path}; trained on the full balanced training split)"}
    if s["generator"] != "regime":
        return s["generator"], {"what": f"generator folder {s['generator']}"}
    stages = s["generator_fit_stages"]
    folder = os.path.join(out, "generators", f"{_data_key(s)}-{regime}-{s['generator_size']}px-"
                                             f"{'-'.join(map(str, stages))}")
    meta_path = os.path.join(folder, "fit.json")
    if os.path.exists(meta_path) and not s["quick"]:
        with open(meta_path) as f:
            return folder, json.load(f)
    k = train.num_classes
    if s["quick"]:
        cfg = ClassConditionalConfig(num_classes=k, in_channels=train.images.shape[1], block_out_channels=(16, 32),
                                     norm_num_groups=8, attention_head_dim=8, image_size=s["generator_size"],
                                     num_inference_steps=s["generator_steps"])
        gen = ClassConditionalGenerator(cfg, None, 0)
    else:
        gen = ClassConditionalGenerator.for_dataset(train, num_inference_steps=s["generator_steps"],
                                                    image_size=s["generator_size"])
    curve, done, t0, losses = [], 0, time.perf_counter(), []
    for i, total in enumerate(stages):
        if total > done:
            print(f"[{regime}] fitting the generator on {len(train)} training images: steps {done} -> {total}",
                  flush=True)
            fit = gen.fit(train, steps=total - done, batch_size=64, seed=i, progress=not s.get("no_progress"))
            losses = fit.losses
            done = total
        per = 2 if s["quick"] else 30
        fid, per_class = class_fidelity(gen, judge, num_per_class=per, seed=0, per_class=True)
        curve.append({"steps": done, "fidelity": fid, "fidelity_per_class": per_class,
                      "seconds": time.perf_counter() - t0})
        print(f"[{regime}] generator after {done} steps: class fidelity {fid:.3f} (judge, {per} samples/class)",
              flush=True)
    gen.save(folder)
    tail_loss = sum(losses[-50:]) / len(losses[-50:]) if losses else None
    meta = {"what": f"class-conditional UNet ({gen.num_parameters() / 1e6:.2f}M parameters, {s['generator_size']} px) "
                    f"fitted on the {regime} training split ({len(train)} images, {done} steps, batch 64)",
            "fidelity": curve[-1]["fidelity"], "fidelity_curve": curve, "final_loss": tail_loss,
            "seconds": time.perf_counter() - t0}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return folder, meta


def generator_factory(ctx: dict[str, Any], s: dict[str, Any]) -> Any:
    """A picklable zero-argument factory of the run's generator (the worker process builds its own)."""
    from hardneg.generators import load_generator

    guidance = {} if s.get("guidance_scale") is None else {"guidance_scale": s["guidance_scale"]}
    if s["generator_backend"] == "stable-diffusion":
        return functools.partial(load_generator, "stable-diffusion", ctx["generator_path"],
                                 class_names=list(ctx["train"].class_names), device=s["device"],
                                 num_inference_steps=s["generator_steps"], **guidance)
    return functools.partial(load_generator, "class-conditional", ctx["generator_path"],
                             num_inference_steps=s["generator_steps"], device=s["device"], **guidance)


# ---------------------------------------------------------------------------------- generated sets up front
def _random_pair_sources(train: Any, n: int, seed: int) -> tuple[Any, Any, Any]:
    """``n`` (source index, source class, target class) over random ordered pairs A != B, cycling."""
    import torch

    k = train.num_classes
    g = torch.Generator().manual_seed(10_000 + seed)
    pairs = [(a, b) for a in range(k) for b in range(k) if a != b]
    order = torch.randperm(len(pairs), generator=g).tolist()
    by_class = [(train.labels == c).nonzero().flatten() for c in range(k)]
    src_idx, src_lab, tgt = [], [], []
    for i in range(n):
        a, b = pairs[order[i % len(pairs)]]
        pool = by_class[a]
        src_idx.append(int(pool[torch.randint(0, len(pool), (1,), generator=g)]))
        src_lab.append(a)
        tgt.append(b)
    return torch.tensor(src_idx), torch.tensor(src_lab), torch.tensor(tgt)


def _translated_set(factory: Any, train: Any, n: int, seed: int, strengths: Any) -> dict[str, Any]:
    """Random sources of class A turned towards random B (offline GeNIe, Diff-Mix), generated up front."""
    import torch

    gen = factory()
    src_idx, src_lab, tgt = _random_pair_sources(train, n, seed)
    g = torch.Generator().manual_seed(30_000 + seed)
    if isinstance(strengths, float):
        ratios = torch.full((n,), strengths)
    else:
        ratios = torch.tensor(strengths)[torch.randint(0, len(strengths), (n,), generator=g)]
    chunks = []
    for start in range(0, n, 32):
        sel = slice(start, start + 32)
        chunks.append(gen.generate(train.images[src_idx[sel]], src_lab[sel], tgt[sel], ratios[sel],
                                   seed=seed * 1000 + start).cpu())
    return {"images": torch.cat(chunks).clamp(0, 1), "source_labels": src_lab, "labels": tgt, "ratios": ratios}


def _auggen_set(factory: Any, train: Any, n: int, s: dict[str, Any], seed: int) -> Any:
    """AugGen expansion: ``n`` images over random class pairs, each mix a new label K + m."""
    import torch

    from hardneg.data import ImageDataset
    from hardneg.methods.auggen import auggen_expand

    k = train.num_classes
    gen = factory()
    g = torch.Generator().manual_seed(20_000 + seed)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[: s["auggen_pairs"]].tolist()]
    per_mix = max(1, n // len(chosen))
    alpha = s["auggen_alpha"]
    expanded = auggen_expand(gen, train, chosen, alpha=alpha, beta=alpha, n_per_mix=per_mix, seed=seed)
    m = len(train)
    return ImageDataset(expanded.images[m:], expanded.labels[m:], expanded.class_names), chosen


def _fusion_generator(base: Any, train: Any, test: Any, seed: int, s: dict[str, Any]) -> Any:
    """Elberg et al.'s fusion mode: CAMs from a classifier first trained on the real data, then refined by ``base``."""
    import torch

    from hardneg.methods.long_tail import SaliencyFusionGenerator
    from hardneg.training import make_classifier, train as train_model

    torch.manual_seed(seed)
    cam_model = make_classifier(s["model"], num_classes=train.num_classes, in_chans=train.images.shape[1])
    train_model(cam_model, train, test, epochs=10**6, batch_size=s["batch_size"], lr=s["lr"], seed=seed,
                max_steps=s["steps"], progress=False)
    return SaliencyFusionGenerator(cam_model, train, base=base)


# ---------------------------------------------------------------------------------- engine configs
def _engine_config(method: Method, s: dict[str, Any], seed: int, k: int, images: int, steps: int) -> Any:
    from hardneg.config import HardNegConfig
    from hardneg.methods.da_fusion import da_fusion_config

    per_refresh = max(1, images // s["refreshes"])
    common: dict[str, Any] = dict(
        refresh_every=10**9, images_per_refresh=per_refresh, generation_batch=16, worker_backend=s["worker"],
        worker_threads=1, queue_size=max(64, per_refresh), buffer_size=max(1024, 2 * images), seed=seed,
        total_steps=steps, deterministic=s["deterministic"], freshness_half_life=max(1, steps // 4),
        use_gpu_index=False, worker_device=s["device"], **ARRIVAL_SCORING,
    )
    over = dict(method.engine)
    policy = over.pop("policy", "confusion")
    if policy == "same-class":
        return da_fusion_config(k, p=0.5, strength=0.5, **common)
    if policy in ("long-tail", "long-tail-fusion"):
        ratio = s["long_tail_ratio"] if policy == "long-tail" else FUSION_RATIO
        if policy == "long-tail-fusion":
            common["worker_backend"] = "thread"  # the fusion generator holds the CAM classifier
        return HardNegConfig(num_classes=k, targeting="long-tail", sources_per_pair=24, synthetic_fraction=0.25,
                             curriculum="constant", r_start=ratio, long_tail_ratio=ratio,
                             label_mode="hard", **common)  # as published: labelled as the tail class
    r_min = s["hardneg_r_min"]
    hardneg: dict[str, Any] = dict(HARDNEG_COMMON, r_start=max(0.7, r_min), r_end=max(0.4, r_min), r_min=r_min,
                                   r_max=0.9, adaptive_step=0.05, adaptive_min_samples=16)
    hardneg.update(over)
    return HardNegConfig(num_classes=k, **{**common, **hardneg})


# ---------------------------------------------------------------------------------- one run
def _base_transform(s: dict[str, Any], seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return standard_augment(g) if s["data"] == "digits" else crop_flip(g, pad=max(1, s["image_size"] // 8))


def _finite_mean(values: Any) -> Optional[float]:
    import torch

    if values is None:
        return None
    v = torch.as_tensor(values, dtype=torch.float32)
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else None


def _label_quality(judge: Any, images: Any, given: Any, source: Any, target_weight: Any = None,
                   model_p: Any = None, teacher_p: Any = None) -> dict[str, Any]:
    """What the judge reads in generated images: their given label, their source class, or other."""
    import torch

    from hardneg.judge import judge_probs

    n = int(given.shape[0])
    if n == 0:
        return {"n": 0}
    pred = judge_probs(judge, images.float()).argmax(1)
    as_given = pred == given
    as_source = (pred == source) & ~as_given
    res = {"n": n, "as_given": float(as_given.float().mean()), "as_source": float(as_source.float().mean()),
           "other": float((~as_given & ~as_source).float().mean()),
           "same_class": bool((given == source).all())}
    res["mean_target_weight"] = _finite_mean(target_weight)
    res["model_p_label_at_arrival"] = _finite_mean(model_p)
    res["teacher_p_target_at_arrival"] = _finite_mean(teacher_p)
    return res


def _engine_generated(engine: Any) -> dict[str, Any]:
    """The images the engine kept (its buffer; large enough that nothing was evicted) and their provenance."""
    state = engine.buffer.state_dict()
    prov = engine.buffer.provenance()
    return {"images": state["images"], "labels": prov["target_labels"], "source_labels": prov["source_labels"],
            "target_weight": prov.get("target_weight"), "model_p": prov.get("model_p_target"),
            "teacher_p": prov.get("teacher_p_target"),
            "evicted": engine.buffer.stats()["evicted"]}


def _one_run(key: str, regime: str, seed: int, ctx: dict[str, Any], s: dict[str, Any], steps: int) -> dict[str, Any]:
    import torch

    from hardneg.plugin import HardNeg
    from hardneg.training import make_classifier, predict, train

    method = METHODS[key]
    factory: Any = generator_factory(ctx, s) if method.generates else None
    tr, te = ctx["train"], ctx["test"]
    k, channels = tr.num_classes, tr.images.shape[1]
    images = ctx["images"]
    torch.manual_seed(seed)
    outputs, extra, extra_targets, mixed_pairs, generated = k, None, None, None, None
    t0 = time.perf_counter()
    if method.kind in ("offline-genie", "diff-mix"):
        from hardneg.data import ImageDataset

        if method.kind == "offline-genie":
            g = _translated_set(factory, tr, images, seed, 0.8)
        else:
            g = _translated_set(factory, tr, images, seed, DIFF_MIX_STRENGTHS)
            w = g["ratios"] ** s["diffmix_gamma"]
            extra_targets = torch.zeros(images, k)
            extra_targets[torch.arange(images), g["labels"]] = w
            extra_targets[torch.arange(images), g["source_labels"]] += 1 - w
            g["target_weight"] = w
        extra = ImageDataset(g["images"], g["labels"], list(tr.class_names))
        generated = g
    elif method.kind == "auggen":
        extra, mixed_pairs = _auggen_set(factory, tr, images, s, seed)
        outputs = extra.num_classes
    gen_s = time.perf_counter() - t0
    torch.manual_seed(seed)  # the same initial weights as every other method (generating drew from the RNG)
    model = make_classifier(s["model"], num_classes=outputs, in_chans=channels)
    kw: dict[str, Any] = dict(epochs=10**6, batch_size=s["batch_size"], lr=s["lr"], seed=seed, max_steps=steps,
                              progress=False, extra_data=extra, extra_targets=extra_targets, device=s["device"],
                              evaluate_every_epoch=False)
    transforms = [_base_transform(s, seed)] if method.augment else []
    if method.kind == "mixup":
        transforms.append(mixup_cutmix(k))
    if transforms:
        kw["batch_transform"] = _compose(*transforms)
    engine = cfg = None
    if method.kind == "engine":
        cfg = _engine_config(method, s, seed, k, images, steps)
        if method.engine.get("policy") == "long-tail-fusion":
            factory = _fusion_generator(factory(), tr, te, seed, s)
        # refreshes (and requests) at the run's fixed steps, inline; --deterministic: each waits for its images
        cfg = cfg.replace(refresh_at=tuple(ctx["refresh_steps"]), async_refresh=False)
        engine = HardNeg(cfg, model=model, class_names=tr.class_names, dataset=tr, generator=factory)
        kw["engine"] = engine
    try:
        history = train(model, tr, te, **kw)
        if engine is not None:
            engine.collect()
            generated = _engine_generated(engine)
    finally:
        if engine is not None:
            engine.close(timeout=10)
    preds = predict(model, te, num_classes=k, device=s["device"])
    res: dict[str, Any] = {
        "method": key, "regime": regime, "seed": seed, "steps": steps,
        "accuracy": float((preds == te.labels).float().mean()),
        "seconds": time.perf_counter() - t0, "generation_seconds_upfront": gen_s, "preds": preds.tolist(),
        "final_loss": history[-1].loss if history else None,
    }
    if extra is not None:
        res["generated_images"] = res["images_requested"] = res["images_received"] = res["images_kept"] = len(extra)
    if mixed_pairs is not None:
        res["mixed_pairs"] = [list(p) for p in mixed_pairs]
    if engine is not None:
        st = engine.stats()
        res.update({
            "images_requested": int(st["images_requested"]), "images_received": int(st["images_received"]),
            "images_kept": int(engine.buffer.stats()["added"]), "generated_images": int(st["images_received"]),
            "images_filtered": int(st.get("images_filtered_low", 0)) + int(st.get("images_filtered_high", 0)),
            "images_budget": len(ctx["refresh_steps"]) * cfg.images_per_refresh,
            "synthetic_used": int(st["synthetic_used"]), "mean_r": st["mean_r"],
            "buffer_mean_r": generated_mean_r(engine), "engine_fraction": st["engine_fraction"],
            "worker_failures": (st.get("worker") or {}).get("failures"),
            "top_pairs": [[p.a, p.b, round(p.score, 4)] for p in engine.confusions(4)],
        })
    if generated is not None and method.kind != "auggen":
        res["label_quality"] = _label_quality(ctx["judge"], generated["images"], generated["labels"],
                                              generated["source_labels"], generated.get("target_weight"),
                                              generated.get("model_p"), generated.get("teacher_p"))
    return res


def generated_mean_r(engine: Any) -> Optional[float]:
    """Mean noise ratio r of the synthetic images in the engine's buffer at the end (None if empty)."""
    ratios = engine.buffer.provenance()["ratios"]
    return float(ratios.float().mean()) if ratios.numel() else None


# ---------------------------------------------------------------------------------- cache
FINGERPRINT_DEFAULTS = {"generator_backend": "class-conditional", "device": "cpu", "guidance_scale": None}

GENERATION_SETTINGS = ("generator", "generator_fit_stages", "generator_backend", "generator_size", "generator_steps",
                       "guidance_scale", "budget", "images_override", "judge_epochs", "diffmix_gamma", "auggen_pairs", "auggen_alpha")
ENGINE_SETTINGS = ("refreshes", "worker", "deterministic", "hardneg_r_min", "long_tail_ratio")


def _fingerprint(s: dict[str, Any], regime: str, key: str, steps: int, legacy: bool = False) -> str:
    """A hash of the settings that can change run ``key``'s result (all settings with ``legacy``).

    Settings a method does not read are left out, so e.g. base runs are reused by an invocation
    that only adds ``--deterministic`` or another budget.
    """
    skip = {"methods", "seeds", "regimes", "pair_seeds", "curve_steps", "steps", "no_progress"}
    method = METHODS[key]
    if not legacy:
        if not method.generates:
            skip.update(GENERATION_SETTINGS)
        if method.kind != "engine":
            skip.update(ENGINE_SETTINGS)
    relevant = {k: v for k, v in s.items() if k not in skip}
    for name, default in FINGERPRINT_DEFAULTS.items():  # settings added later: their defaults keep old caches valid
        if relevant.get(name) == default:
            relevant.pop(name, None)
    relevant.update(regime=regime, method=method.label, engine=method.engine, steps=steps)
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_run(key: str, regime: str, seed: int, ctx: dict[str, Any], s: dict[str, Any], out: str,
                resume: bool, steps: Optional[int] = None) -> dict[str, Any]:
    steps = steps or s["steps"]
    fp = _fingerprint(s, regime, key, steps)

    def path_of(f: str) -> str:
        return os.path.join(out, "runs", regime, f"{key}-seed{seed}-steps{steps}-{f}.json")

    for candidate in (fp, _fingerprint(s, regime, key, steps, legacy=True)):  # runs cached before the lean hash
        if resume and os.path.exists(path_of(candidate)):
            with open(path_of(candidate)) as f:
                r = json.load(f)
            r["cached"] = True
            return r
    r = _one_run(key, regime, seed, ctx, s, steps)
    r["fingerprint"] = fp
    if not s["quick"]:
        os.makedirs(os.path.dirname(path_of(fp)), exist_ok=True)
        with open(path_of(fp), "w") as f:
            json.dump(r, f)
    return r


# ---------------------------------------------------------------------------------- metrics
def _refresh_steps(steps: int, refreshes: int) -> list[int]:
    """``refreshes`` steps spread evenly over [5%, 60%] of training (at least step 1)."""
    if refreshes == 1:
        return [max(1, round(0.05 * steps))]
    lo, hi = 0.05 * steps, 0.6 * steps
    return sorted({max(1, round(lo + i * (hi - lo) / (refreshes - 1))) for i in range(refreshes)})


def confused_pairs(runs: list[dict[str, Any]], test_labels: Any, k: int, top: int = 3) -> list[list[int]]:
    """The ``top`` unordered class pairs ``runs`` confuse most on the test set: [a, b, count]."""
    import numpy as np

    conf = np.zeros((k, k), dtype=np.int64)
    y = np.asarray(test_labels)
    for r in runs:
        np.add.at(conf, (y, np.asarray(r["preds"])), 1)
    sym = conf + conf.T
    np.fill_diagonal(sym, 0)
    iu = np.triu_indices(k, 1)
    order = np.argsort(-sym[iu], kind="stable")[:top]
    return [[int(iu[0][i]), int(iu[1][i]), int(sym[iu][i])] for i in order]


def class_group_accuracy(preds: list[int], test_labels: Any, classes: list[int]) -> Optional[float]:
    """Mean per-class accuracy over ``classes`` (None if empty)."""
    import numpy as np

    y, p = np.asarray(test_labels), np.asarray(preds)
    accs = [float((p[y == c] == c).mean()) for c in classes if (y == c).any()]
    return float(np.mean(accs)) if accs else None


def _add_metrics(r: dict[str, Any], test_labels: Any, k: int, groups: dict[str, Optional[list[int]]]) -> None:
    r["per_class"] = [class_group_accuracy(r["preds"], test_labels, [c]) for c in range(k)]
    for name, classes in groups.items():
        r[name] = class_group_accuracy(r["preds"], test_labels, classes) if classes else None


ALTERNATIVES = ("da-fusion", "offline-genie", "diff-mix")  # what every hardneg row is also compared with
METRICS = (("accuracy", "overall"), ("tail_accuracy", "tail classes"), ("few_accuracy", "few classes"),
           ("pair_accuracy", "confused pairs"))


def summarise(runs: list[dict[str, Any]], methods: list[str], base: str = "base") -> dict[str, Any]:
    """Per method: mean/std of every metric and the paired difference to ``base`` (by seed)."""
    import numpy as np

    by_seed = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out: dict[str, Any] = {}
    for m in methods:
        rs = [by_seed.get((m, sd)) for sd in seeds]
        rs_present = [r for r in rs if r is not None]
        entry: dict[str, Any] = {"n_seeds": len(rs_present)}
        for key in [k for k, _ in METRICS] + ["generated_images", "images_requested", "images_received",
                                               "images_kept", "synthetic_used", "seconds"]:
            mean, std = C.mean_std([r.get(key) for r in rs_present])
            entry[key] = {"mean": mean, "std": std}
            if key in dict(METRICS):
                for ref in [base] + [a for a in ALTERNATIVES if m.startswith("hardneg")]:
                    if ref not in methods or (ref == m and ref != base):
                        continue
                    bs = [by_seed.get((ref, sd)) for sd in seeds]
                    vals = [r.get(key) if r and b else None for r, b in zip(rs, bs)]
                    bvals = [b.get(key) if r and b else None for r, b in zip(rs, bs)]
                    name = "vs_base" if ref == base else f"vs_{ref}"
                    entry[key][name] = S.paired_difference(vals, bvals).to_dict()
        lq = [r["label_quality"] for r in rs_present if r.get("label_quality", {}).get("n")]
        if lq:
            entry["label_quality"] = {f: (float(np.mean([q[f] for q in lq if q.get(f) is not None]))
                                          if any(q.get(f) is not None for q in lq) else None)
                                      for f in ("n", "as_given", "as_source", "other", "mean_target_weight",
                                                "model_p_label_at_arrival", "teacher_p_target_at_arrival")}
            entry["label_quality"]["same_class"] = all(q.get("same_class") for q in lq)
        pcs = [r["per_class"] for r in rs_present if r.get("per_class")]
        if pcs:
            entry["per_class"] = [float(np.mean([pc[c] for pc in pcs if pc[c] is not None])) for c in range(len(pcs[0]))]
        out[m] = entry
    return out


# ---------------------------------------------------------------------------------- driver
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    s = _settings(args)
    s["no_progress"] = bool(args.no_progress)
    out = args.out
    cache = args.cache_dir or out
    info = C.machine_info()
    print(C.header("accuracy", info), flush=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, s["train_threads"]))
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    resume = not args.no_resume
    results: dict[str, Any] = {"benchmark": NAME, "command": C.command_line(NAME), "quick": bool(args.quick),
                               "settings": s, "machine": info, "regimes": {}}
    try:
        full, test = _load_full(s, cache)
        judge, results["judge"] = _judge(s, full, test, cache)
        for regime in s["regimes"]:
            results["regimes"][regime] = _run_regime(regime, full, test, judge, s, out, cache, resume)
            _write_partial(out, results)
    finally:
        torch.set_num_threads(threads_before)
    results["seconds"] = time.perf_counter() - t_start
    results["table_markdown"] = table(results)
    print(results["table_markdown"], flush=True)
    plots = [_plot_deltas(results, out), _plot_per_class(results, out)]
    if any(reg.get("convergence") for reg in results["regimes"].values()):
        plots.append(_plot_convergence(results, out))
    results["plots"] = plots
    return C.finish(out, results, plots[0])


def _write_partial(out: str, results: dict[str, Any]) -> None:
    C.write_results(out, results, "results.partial.json")


def _run_regime(regime: str, full: Any, test: Any, judge: Any, s: dict[str, Any], out: str, cache: str,
                resume: bool) -> dict[str, Any]:
    k = full.num_classes
    tr = _regime_train(full, regime, s)
    counts = tr.class_counts()
    images = _images_for(tr, s)
    print(f"[{regime}] {len(tr)} train images, class counts {counts}; {len(test)} test; "
          f"{images} generated images per generating method", flush=True)
    ctx: dict[str, Any] = {"train": tr, "test": test, "images": images, "judge": judge,
                           "refresh_steps": _refresh_steps(s["steps"], s["refreshes"])}
    methods = [m for m in s["methods"] if METHODS[m].regimes is None or regime in METHODS[m].regimes]
    gen_meta = None
    if any(METHODS[m].generates for m in methods):
        ctx["generator_path"], gen_meta = _generator_folder(s, regime, tr, judge, cache)
        print(f"[{regime}] generator: {gen_meta['what']} (fidelity {C.fmt(gen_meta.get('fidelity'))})", flush=True)
    # Confused pairs are fixed before the comparison, from base runs with seeds of their own.
    selection = [_cached_run("base", regime, sd, ctx, s, out, resume) for sd in s["pair_seeds"]]
    pairs = confused_pairs(selection, test.labels, k)
    order = sorted(range(k), key=lambda c: (counts[c], c))
    groups = {"tail_accuracy": order[: max(1, k // 2)] if regime == "long-tail" else None,
              "few_accuracy": [c for c in range(k) if counts[c] < FEW_CLASS_LIMIT] or None,
              "pair_accuracy": sorted({c for a, b, _ in pairs for c in (a, b)})}
    curve = {}
    for steps in s["curve_steps"]:
        rs = [_cached_run("base", regime, sd, ctx, s, out, resume, steps=steps) for sd in s["pair_seeds"]]
        mean, std = C.mean_std([r["accuracy"] for r in rs])
        curve[str(steps)] = {"mean": mean, "std": std, "per_seed": [r["accuracy"] for r in rs]}
        print(f"[{regime}] convergence: base at {steps} steps {100 * mean:.1f} ± {100 * std:.1f}", flush=True)
    runs = []
    for seed in s["seeds"]:  # seeds outer, methods inner: drifting machine load hits all methods alike
        for m in methods:
            r = _cached_run(m, regime, seed, ctx, s, out, resume)
            _add_metrics(r, test.labels, k, groups)
            runs.append(r)
            gen = f", images req/recv/kept {r.get('images_requested')}/{r.get('images_received')}/" \
                  f"{r.get('images_kept')}" if "images_requested" in r else ""
            lq = r.get("label_quality") or {}
            lq_s = f", judge as-given {lq['as_given']:.2f}" if lq.get("n") else ""
            print(f"[{regime}] seed {seed} {m:16s} acc {r['accuracy']:.3f} pairs {C.fmt(r['pair_accuracy'])}"
                  f"{gen}{lq_s} ({r['seconds']:.0f}s{', cached' if r.get('cached') else ''})", flush=True)
    return {"train_size": len(tr), "class_counts": counts, "test_size": len(test), "images": images,
            "confused_pairs": pairs, "pair_seeds": s["pair_seeds"], "groups": groups, "generator": gen_meta,
            "refresh_steps": ctx["refresh_steps"], "convergence": curve,
            "summary": summarise(runs, methods), "runs": runs}


# ---------------------------------------------------------------------------------- tables and plots
def _pm(e: dict[str, Any], scale: float = 100.0) -> str:
    if e.get("mean") is None:
        return "-"
    return f"{scale * e['mean']:.1f} ± {scale * e['std']:.1f}"


def _diff(e: dict[str, Any]) -> str:
    d = e.get("vs_base")
    return "-" if not d else S.format_difference(S.PairedDifference(**d))


def table(results: dict[str, Any]) -> str:
    """The markdown tables: accuracy with paired differences, label quality, convergence."""
    parts = []
    for regime, reg in results["regimes"].items():
        summ = reg["summary"]
        keys = [(k, lab) for k, lab in METRICS if any(e[k]["mean"] is not None for e in summ.values())]
        headers = ["method"]
        for _, lab in keys:
            headers += [f"{lab} %", "Δ vs base [95% CI]"]
        headers += ["images req / recv / kept", "run s"]
        rows = []
        for m, e in summ.items():
            row = [METHODS[m].label]
            for key, _ in keys:
                row += [_pm(e[key]), _diff(e[key]) if m != "base" else ""]
            req, recv, kept = (e[x]["mean"] for x in ("images_requested", "images_received", "images_kept"))
            row += ["-" if req is None else f"{req:.0f} / {recv:.0f} / {kept:.0f}", C.fmt(e["seconds"]["mean"], ".0f")]
            rows.append(row)
        pairs = ", ".join(f"{a}-{b}" for a, b, _ in reg["confused_pairs"])
        n = max(e["n_seeds"] for e in summ.values())
        parts.append(f"**{regime}** ({reg['train_size']} training images {reg['class_counts']}; {reg['images']} "
                     f"generated images per generating method; confused pairs fixed by base seeds "
                     f"{reg['pair_seeds']}: {pairs}; {n} paired seeds)\n\n" + C.markdown_table(headers, rows))
        alt_rows = []
        for m, e in summ.items():
            for ref in ALTERNATIVES:
                if not m.startswith("hardneg") or f"vs_{ref}" not in e["accuracy"]:
                    continue
                row = [METHODS[m].label, f"vs {ref}"]
                for key, _ in keys:
                    d = e[key].get(f"vs_{ref}")
                    row.append("-" if not d else S.format_difference(S.PairedDifference(**d)))
                alt_rows.append(row)
        if alt_rows:
            parts.append(f"hardneg against the other generating methods ({regime}; paired differences, 95% CI)\n\n"
                         + C.markdown_table(["method", "compared with"] + [f"{lab} Δ" for _, lab in keys], alt_rows))
        lq_rows = []
        for m, e in summ.items():
            q = e.get("label_quality")
            if not q:
                continue
            lq_rows.append([METHODS[m].label, f"{q['n']:.0f}", C.fmt(100 * q["as_given"], ".1f"),
                            "(= given)" if q["same_class"] else C.fmt(100 * q["as_source"], ".1f"),
                            C.fmt(100 * q["other"], ".1f"), C.fmt(q.get("mean_target_weight"), ".2f"),
                            C.fmt(q.get("model_p_label_at_arrival"), ".2f"),
                            C.fmt(q.get("teacher_p_target_at_arrival"), ".2f")])
        if lq_rows:
            parts.append(f"Label quality ({regime}; judge test accuracy {C.fmt(results.get('judge', {}).get('test_accuracy'))}"
                         ", trained on the full real training split)\n\n" + C.markdown_table(
                             ["method", "images kept", "judge: as given %", "as source %", "other %",
                              "mean target weight", "classifier P(label) at arrival",
                              "teacher P(target; source or target) at arrival"], lq_rows))
        if reg.get("convergence"):
            parts.append(f"Convergence of base ({regime}, seeds {reg['pair_seeds']})\n\n" + C.markdown_table(
                ["steps", "test accuracy %"], [[st, _pm(v)] for st, v in reg["convergence"].items()]))
    return "\n\n".join(parts)


def _plot_deltas(results: dict[str, Any], out_dir: str) -> str:
    """Paired differences to base with their 95% intervals, per metric and regime."""
    plt = C.pyplot()
    regimes = list(results["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(7 * len(regimes), 4.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        summ = results["regimes"][regime]["summary"]
        methods = [m for m in summ if m != "base"]
        keys = [(k, lab) for k, lab in METRICS if any(summ[m][k].get("vs_base", {}).get("mean") is not None
                                                      for m in methods)]
        width = 0.8 / max(1, len(keys))
        for j, (key, lab) in enumerate(keys):
            xs, means, errs = [], [], [[], []]
            for i, m in enumerate(methods):
                d = summ[m][key].get("vs_base") or {}
                if d.get("mean") is None:
                    continue
                xs.append(i + (j - (len(keys) - 1) / 2) * width)
                means.append(100 * d["mean"])
                lo, hi = d.get("low"), d.get("high")
                errs[0].append(100 * (d["mean"] - lo) if lo is not None else 0)
                errs[1].append(100 * (hi - d["mean"]) if hi is not None else 0)
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=lab)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("paired difference to base, points (95% CI)")
        ax.set_title(f"{os.path.basename(str(results['settings']['data']))}, {regime}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return C.save_figure(fig, os.path.join(out_dir, "accuracy.png"))


def _plot_per_class(results: dict[str, Any], out_dir: str) -> str:
    plt = C.pyplot()
    regimes = list(results["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(7 * len(regimes), 4.2), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        reg = results["regimes"][regime]
        for m, e in reg["summary"].items():
            if e.get("per_class"):
                ax.plot(range(len(e["per_class"])), [100 * v for v in e["per_class"]], marker="o", ms=3, label=m)
        ax.set_xlabel("class (training images: " + ", ".join(map(str, reg["class_counts"])) + ")", fontsize=7)
        ax.set_ylabel("test accuracy % (mean over seeds)")
        ax.set_title(f"per-class accuracy, {regime}")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return C.save_figure(fig, os.path.join(out_dir, "per_class.png"))


def _plot_convergence(results: dict[str, Any], out_dir: str) -> str:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for regime, reg in results["regimes"].items():
        cv = reg.get("convergence") or {}
        if cv:
            xs = [int(x) for x in cv]
            ax.errorbar(xs, [100 * v["mean"] for v in cv.values()], yerr=[100 * v["std"] for v in cv.values()],
                        marker="o", capsize=2, label=regime)
    ax.axvline(results["settings"]["steps"], color="k", ls=":", lw=0.8, label="steps compared")
    ax.set_xscale("log")
    ax.set_xlabel("training steps (each a full one-cycle schedule)")
    ax.set_ylabel("base test accuracy %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return C.save_figure(fig, os.path.join(out_dir, "convergence.png"))


main = C.build_main(__name__)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
