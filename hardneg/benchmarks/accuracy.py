"""accuracy: does online, confusion-targeted GeNIe beat the alternatives on the built-in digits?

Two regimes of :func:`hardneg.data.load_digits` (the same test split for all): **long-tail**
(imbalance ratio 20: class 0 the head with ~130 images, class 9 the tail with 6) and
**few-shot** (10 images per class). Six methods, all at the **same number of training steps**
(same model, optimiser, schedule, batch size), and the three that generate images at the **same
number of generated images**:

a. ``none``: no augmentation;
b. ``standard``: random shifts (+-2 px, i.e. pad-and-crop) and small rotations (+-10 degrees);
c. ``mixup-cutmix``: timm's ``Mixup`` (mixup alpha 0.8, cutmix alpha 1.0, switch 0.5);
d. ``same-class``: DA-Fusion-style same-class diffusion augmentation through the engine
   (``targeting="same-class"``, r = 0.5, label kept, half of each batch substituted:
   :func:`hardneg.methods.da_fusion.da_fusion_config`);
e. ``offline-genie``: the published GeNIe recipe: the images are generated before training from
   random source images of class A for random pairs A != B cycling over all 90 ordered pairs,
   at a fixed r = 0.8, labelled B, and trained on with the real images (``train(extra_data=...)``);
f. ``hardneg``: the engine online: confusion-targeted pairs and boundary sources, a background
   worker process, the adaptive curriculum over r (the demo's settings);
g. ``long-tail``: the same engine with the long-tail targeting policy
   (:class:`hardneg.methods.long_tail.LongTailTargeting`): tail classes as targets, counts in
   proportion to each tail class's deficit, the head samples nearest to the tail class's centroid
   as sources, a fixed r (``--long-tail-ratio``, 0.7). Long-tail regime only (a balanced set has
   no tail);
h. ``auggen``: AugGen training-set expansion
   (:func:`hardneg.methods.auggen.auggen_expand`): ``--auggen-pairs`` random class pairs, each
   mixed condition ``alpha * e_i + beta * e_j`` (alpha = beta = ``--auggen-alpha``, 0.75, the
   paper's range) sampled up front as a **new class**; the classifier gets one extra output per
   mix and is scored on the 10 real logits;
i. ``hardneg-to-rarer``: f with ``extra={"confusion_direction": "to-rarer"}``: every confused
   pair whose target class is more frequent than its source is generated the other way (f's
   default ``"auto"`` turns a pair only at a 2x imbalance), so tail classes gain images instead
   of lending their few samples to head classes. Long-tail regime only;
j. ``long-tail-fusion``: g with the feature-space fusion of Elberg et al. as the generation mode
   (:class:`hardneg.methods.long_tail.SaliencyFusionGenerator`): each head source is spliced
   with a CAM-matched tail image and refined by the regime's generator at r = 0.3. As in the
   paper the CAMs come from a classifier first trained on the real data (same model, same 200
   steps, no augmentation); the generator runs on a worker thread (it holds that classifier).
   Long-tail regime only;
k. ``hardneg-as-mined``: f with ``extra={"confusion_direction": "as-mined"}``: pairs generated
   in the direction they were mined (the engine's behaviour before ``"auto"``). Long-tail regime
   only (in a balanced set it is f).

For the engine methods the engine refreshes at fixed steps spread over the first 60% of training,
each time requesting ``images / refreshes`` images, so they request exactly as many images as e
generates up front; what arrives depends on the worker's speed and is reported, so two runs of
one seed can differ. ``--deterministic`` makes them repeatable: the engine runs with
``deterministic=True`` and the training waits at each refresh until that refresh's images are in
the buffer (every requested image arrives; the waits are not counted as training steps).

Generators: by default a class-conditional diffusion model is fitted on **each regime's own
training split** (``--generator regime``; cached in ``OUT/generators/<regime>``), so no method
sees more data than the classifier does; ``--generator shipped`` uses the digits model shipped
with hardneg (trained on the full balanced training split: more data than the classifier sees in
these regimes), or pass a folder.

Reported per regime and method, mean +- std over seeds: test accuracy, tail-class accuracy
(long-tail: the 5 rarest training classes), and the accuracy on the test images of the 3 most
confused class pairs (the pairs the no-augmentation baseline confuses most, summed over seeds;
the same pairs for every method). ``--quick`` runs a few steps with a tiny random generator.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from typing import Any, Optional

from hardneg.benchmarks import _common as C

NAME = "accuracy"
HELP = "11 methods on the digits (long-tail, few-shot) at equal steps and equal generated images"

METHODS = ("none", "standard", "mixup-cutmix", "same-class", "offline-genie", "hardneg", "long-tail", "auggen",
           "hardneg-to-rarer", "long-tail-fusion", "hardneg-as-mined")
ENGINE_METHODS = ("same-class", "hardneg", "long-tail", "hardneg-to-rarer", "long-tail-fusion", "hardneg-as-mined")
GENERATING_METHODS = ENGINE_METHODS + ("offline-genie", "auggen")
FUSION_RATIO = 0.3  # refinement r of the fusion mode (a few denoising steps over the splice)
ONLY_IN_REGIMES = {"long-tail": ("long-tail",), "hardneg-to-rarer": ("long-tail",),
                   "long-tail-fusion": ("long-tail",), "hardneg-as-mined": ("long-tail",)}  # methods that do not apply to every regime
REGIMES = ("long-tail", "few-shot")
METHOD_LABELS = {
    "none": "(a) no augmentation",
    "standard": "(b) standard augmentation",
    "mixup-cutmix": "(c) mixup/cutmix",
    "same-class": "(d) same-class diffusion (DA-Fusion)",
    "offline-genie": "(e) offline GeNIe, random pairs, r=0.8",
    "hardneg": "(f) hardneg online (default: auto direction)",
    "long-tail": "(g) long-tail targeting, head->tail, r=0.7",
    "auggen": "(h) AugGen expansion, mixed classes",
    "hardneg-to-rarer": "(i) hardneg online, pairs turned towards the rarer class",
    "long-tail-fusion": "(j) long-tail targeting + CAM fusion, r=0.3",
    "hardneg-as-mined": "(k) hardneg online, pairs as mined",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, NAME)
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default=None, help="training seeds (default 0,1,2; quick 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; quick 4)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32; quick 16")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--image-size", type=int, default=16, help="digits are 8x8 natively; 16 px loses nothing")
    p.add_argument("--images", type=int, default=None,
                   help="generated images per run for d, e, f (default 160; quick 8)")
    p.add_argument("--refreshes", type=int, default=None, help="engine refreshes per run for d and f (default 5; quick 2)")
    p.add_argument("--generator", default="regime",
                   help="'regime' (fit on each regime's training split), 'shipped', or a generator folder")
    p.add_argument("--generator-fit-steps", type=int, default=None, help="default 500; quick 0 (random weights)")
    p.add_argument("--generator-steps", type=int, default=None,
                   help="DDIM steps of a full generation schedule (default 20; quick 4)")
    p.add_argument("--long-tail-ratio", type=float, default=0.7, help="r of the long-tail method (g)")
    p.add_argument("--hardneg-r-min", type=float, default=0.3,
                   help="floor of the adaptive curriculum's r for the hardneg methods (f, i, k)")
    p.add_argument("--hardneg-curriculum", default="adaptive",
                   help="curriculum over r of the hardneg methods (f, i, k): adaptive (default), ada (GeNIe-Ada: "
                        "each source's r chosen from a grid by the classifier), linear, cosine, constant, step")
    p.add_argument("--auggen-pairs", type=int, default=8, help="mixed classes of the AugGen method (h)")
    p.add_argument("--auggen-alpha", type=float, default=0.75, help="alpha = beta of the AugGen method (h)")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads of the training loop")
    p.add_argument("--worker", choices=["process", "thread"], default=None,
                   help="engine worker backend (default process; quick thread)")
    p.add_argument("--deterministic", action="store_true",
                   help="engine methods wait at each refresh for its images: repeatable runs, every image arrives")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(bench=NAME)


# ---------------------------------------------------------------------------------- batch transforms
def standard_augment(generator: Any, max_shift: float = 2.0, max_degrees: float = 10.0) -> Any:
    """Random shifts (up to ``max_shift`` px) and rotations (up to ``max_degrees``) per image."""
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


# ---------------------------------------------------------------------------------- engine with scheduled refreshes
class ScheduledRefresh:
    """Wraps a :class:`hardneg.HardNeg` so it refreshes (and requests images) at fixed steps only.

    The engine itself is built with a huge ``refresh_every``; ``train`` talks to this wrapper as
    it would to the engine (``mix``, ``observe``, ``confusions``, ``stats``).
    """

    def __init__(self, engine: Any, refresh_steps: set[int], wait: bool = False) -> None:
        self.engine = engine
        self.refresh_steps = set(refresh_steps)
        self.wait = wait  # block until each refresh's images are in the buffer (--deterministic)

    def mix(self, x: Any, y: Any) -> Any:
        return self.engine.mix(x, y)

    def observe(self, **kwargs: Any) -> None:
        self.engine.observe(**kwargs)
        if self.engine.step in self.refresh_steps:
            self.engine.refresh()
            if self.wait:
                self.engine.wait_for_generation()

    def confusions(self, n: Optional[int] = None) -> Any:
        return self.engine.confusions(n)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()


# ---------------------------------------------------------------------------------- generators
def _generator_folder(args: argparse.Namespace, s: dict[str, Any], regime: str, train: Any) -> tuple[str, str]:
    from hardneg.generators.class_conditional import (
        ClassConditionalConfig, ClassConditionalGenerator, default_digits_generator_path,
    )

    if args.generator == "shipped":
        path = default_digits_generator_path()
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"no shipped generator at {path}; use --generator regime")
        return path, f"shipped digits generator ({path}; trained on the full balanced training split)"
    if args.generator != "regime":
        return args.generator, f"generator folder {args.generator}"
    folder = os.path.join(args.out, "generators", regime)
    meta = os.path.join(folder, "config.json")
    if os.path.exists(meta) and not args.quick:
        return folder, f"class-conditional model fitted on the {regime} training split (cached in {folder})"
    if args.quick:
        cfg = ClassConditionalConfig(num_classes=10, block_out_channels=(16, 32), norm_num_groups=8,
                                     attention_head_dim=8, num_inference_steps=s["generator_steps"])
        gen = ClassConditionalGenerator(cfg, None, args.seed)
        what = "tiny random class-conditional model (--quick)"
    else:
        gen = ClassConditionalGenerator.for_dataset(train, num_inference_steps=s["generator_steps"])
        print(f"[{regime}] fitting a class-conditional generator on the {len(train)} training images "
              f"({s['generator_fit_steps']} steps)", flush=True)
        fit = gen.fit(train, steps=s["generator_fit_steps"], batch_size=64, seed=args.seed,
                      progress=not args.no_progress)
        what = (f"class-conditional model fitted on the {regime} training split ({len(train)} images, "
                f"{fit.steps} steps, batch 64, final loss {sum(fit.losses[-50:]) / len(fit.losses[-50:]):.4f}, "
                f"{fit.seconds:.0f}s)")
    gen.save(folder)
    return folder, what


# ---------------------------------------------------------------------------------- one run
def _engine_config(method: str, s: dict[str, Any], seed: int) -> Any:
    from hardneg.config import HardNegConfig

    per_refresh = max(1, s["images"] // s["refreshes"])
    common = dict(
        refresh_every=10**9, images_per_refresh=per_refresh, generation_batch=16, worker_backend=s["worker"],
        worker_threads=1, queue_size=64, buffer_size=1024, seed=seed, total_steps=s["steps"],
        deterministic=s["deterministic"],
        freshness_half_life=max(1, s["steps"] // 4), use_gpu_index=False,
    )
    if method in ("long-tail", "long-tail-fusion"):
        ratio = s["long_tail_ratio"] if method == "long-tail" else FUSION_RATIO
        if method == "long-tail-fusion":
            common["worker_backend"] = "thread"  # the fusion generator holds the CAM classifier
        return HardNegConfig(num_classes=10, targeting="long-tail", sources_per_pair=24, synthetic_fraction=0.25,
                             curriculum="constant", r_start=ratio, extra={"long_tail_ratio": ratio}, **common)
    if method == "same-class":
        try:
            from hardneg.methods.da_fusion import da_fusion_config

            return da_fusion_config(10, p=0.5, strength=0.5, **common)
        except ImportError:  # pragma: no cover - the methods package is optional
            return HardNegConfig(num_classes=10, targeting="same-class", mix_mode="substitute",
                                 synthetic_fraction=0.5, curriculum="constant", r_start=0.5,
                                 extra={"same_class_strength": 0.5}, **common)
    direction = {"hardneg-to-rarer": "to-rarer", "hardneg-as-mined": "as-mined"}.get(method)
    extra = {"confusion_direction": direction} if direction else {}
    return HardNegConfig(
        num_classes=10, extra=extra, top_pairs=4, knn_k=10, sources_per_pair=24, synthetic_fraction=0.25,
        curriculum=s["hardneg_curriculum"], r_start=max(0.7, s["hardneg_r_min"]), r_end=max(0.4, s["hardneg_r_min"]),
        r_min=s["hardneg_r_min"], r_max=0.9, adaptive_step=0.05,
        adaptive_min_samples=16, **common,
    )


def _offline_set(gen_folder: str, train: Any, s: dict[str, Any], seed: int) -> Any:
    """The published GeNIe recipe: random sources for random ordered pairs (all 90 in turn), r = 0.8."""
    import torch

    from hardneg.data import ImageDataset
    from hardneg.generators import load_generator

    gen = load_generator("class-conditional", gen_folder, num_inference_steps=s["generator_steps"])
    g = torch.Generator().manual_seed(10_000 + seed)
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    order = torch.randperm(len(pairs), generator=g).tolist()
    src_idx, src_lab, tgt = [], [], []
    by_class = [(train.labels == c).nonzero().flatten() for c in range(10)]
    for i in range(s["images"]):
        a, b = pairs[order[i % len(pairs)]]
        pool = by_class[a]
        src_idx.append(int(pool[torch.randint(0, len(pool), (1,), generator=g)]))
        src_lab.append(a)
        tgt.append(b)
    sources = train.images[torch.tensor(src_idx)]
    sl, tl = torch.tensor(src_lab), torch.tensor(tgt)
    chunks = []
    for start in range(0, len(tl), 32):
        sel = slice(start, start + 32)
        chunks.append(gen.generate(sources[sel], sl[sel], tl[sel], 0.8, seed=seed * 1000 + start))
    return ImageDataset(torch.cat(chunks).clamp(0, 1), tl, list(train.class_names))


def _auggen_set(gen_folder: str, train: Any, s: dict[str, Any], seed: int) -> Any:
    """AugGen expansion: ``images`` generated over random class pairs, each mix a new label 10 + m."""
    import torch

    from hardneg.data import ImageDataset
    from hardneg.generators import load_generator
    from hardneg.methods.auggen import auggen_expand

    gen = load_generator("class-conditional", gen_folder, num_inference_steps=s["generator_steps"])
    g = torch.Generator().manual_seed(20_000 + seed)
    pairs = [(a, b) for a in range(10) for b in range(a + 1, 10)]
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[: s["auggen_pairs"]].tolist()]
    per_mix = max(1, s["images"] // len(chosen))
    alpha = s["auggen_alpha"]
    expanded = auggen_expand(gen, train, chosen, alpha=alpha, beta=alpha, n_per_mix=per_mix, seed=seed)
    n = len(train)
    return ImageDataset(expanded.images[n:], expanded.labels[n:], expanded.class_names), chosen


def _fusion_generator(base: Any, train: Any, test: Any, seed: int, s: dict[str, Any]) -> Any:
    """Elberg et al.'s fusion mode: CAMs from a classifier first trained on the real data, then refined by ``base``."""
    import torch

    from hardneg.methods.long_tail import SaliencyFusionGenerator
    from hardneg.training import make_classifier, train as train_model

    torch.manual_seed(seed)
    cam_model = make_classifier(s["model"], num_classes=10, in_chans=1)
    train_model(cam_model, train, test, epochs=10**6, batch_size=s["batch_size"], lr=s["lr"], seed=seed,
                max_steps=s["steps"], progress=False)
    return SaliencyFusionGenerator(cam_model, train, base=base)


def _one_run(method: str, regime: str, seed: int, data: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    import torch

    from hardneg.generators import load_generator
    from hardneg.plugin import HardNeg
    from hardneg.training import make_classifier, predict, train

    tr, te = data["train"], data["test"]
    torch.manual_seed(seed)
    outputs, extra, mixed_pairs = 10, None, None
    t0 = time.perf_counter()
    if method == "offline-genie":
        extra = _offline_set(data["generator_path"], tr, s, seed)
    elif method == "auggen":
        extra, mixed_pairs = _auggen_set(data["generator_path"], tr, s, seed)
        outputs = extra.num_classes  # one extra output per mixed class
    gen_s = time.perf_counter() - t0
    torch.manual_seed(seed)  # the same initial weights as every other method (loading a generator draws from it)
    model = make_classifier(s["model"], num_classes=outputs, in_chans=1)
    kw: dict[str, Any] = dict(epochs=10**6, batch_size=s["batch_size"], lr=s["lr"], seed=seed, max_steps=s["steps"],
                              progress=False)
    engine = wrapper = None
    if extra is not None:
        kw["extra_data"] = extra
    if method == "standard":
        kw["batch_transform"] = standard_augment(torch.Generator().manual_seed(seed))
    elif method == "mixup-cutmix":
        kw["batch_transform"] = mixup_cutmix(10)
    elif method in ENGINE_METHODS:
        cfg = _engine_config(method, s, seed)
        factory: Any = functools.partial(load_generator, "class-conditional", data["generator_path"],
                                         num_inference_steps=s["generator_steps"])
        if method == "long-tail-fusion":
            factory = _fusion_generator(factory(), tr, te, seed, s)
        engine = HardNeg(cfg, model=model, class_names=tr.class_names, dataset=tr, generator=factory)
        wrapper = ScheduledRefresh(engine, data["refresh_steps"], wait=s["deterministic"])
        kw["engine"] = wrapper
    try:
        history = train(model, tr, te, **kw)
        if engine is not None:
            engine.collect()
    finally:
        if engine is not None:
            engine.close(timeout=10)
    preds = predict(model, te, num_classes=10)
    res: dict[str, Any] = {
        "method": method, "regime": regime, "seed": seed,
        "accuracy": float((preds == te.labels).float().mean()),
        "tail_accuracy": history[-1].tail_accuracy if history else None,
        "steps": s["steps"], "seconds": time.perf_counter() - t0, "generation_seconds_upfront": gen_s,
        "preds": preds.tolist(),
    }
    if extra is not None:
        res["generated_images"] = len(extra)
        res["images_requested"] = len(extra)
    if mixed_pairs is not None:
        res["mixed_pairs"] = [list(p) for p in mixed_pairs]
    if engine is not None:
        st = engine.stats()
        res.update({
            "generated_images": int(st["images_received"]), "synthetic_used": int(st["synthetic_used"]),
            "images_requested": int(st["images_requested"]),  # what the plans asked for (<= the budget)
            "images_budget": len(data["refresh_steps"]) * cfg.images_per_refresh,
            "mean_r": st["mean_r"], "engine_fraction": st["engine_fraction"],
            "buffer_mean_r": _buffer_mean_r(engine),
            "worker_failures": (st.get("worker") or {}).get("failures"),
            "top_pairs": [[p.a, p.b, round(p.score, 4)] for p in engine.confusions(4)],
        })
    return res


def _buffer_mean_r(engine: Any) -> Optional[float]:
    """Mean noise ratio r of the synthetic images in the engine's buffer at the end (None if empty)."""
    ratios = engine.buffer.provenance()["ratios"]
    return float(ratios.float().mean()) if ratios.numel() else None


# ---------------------------------------------------------------------------------- driver
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    s = {
        "regimes": C.parse_list(args.regimes), "methods": C.parse_list(args.methods),
        "seeds": C.parse_list(args.seeds, int) or ([0] if q else [0, 1, 2]),
        "steps": args.steps or (4 if q else 200), "batch_size": args.batch_size or (16 if q else 32),
        "lr": args.lr, "model": args.model, "image_size": args.image_size,
        "images": args.images or (8 if q else 160), "refreshes": args.refreshes or (2 if q else 5),
        "generator": args.generator,
        "generator_fit_steps": args.generator_fit_steps if args.generator_fit_steps is not None else (0 if q else 500),
        "generator_steps": args.generator_steps or (4 if q else 20),
        "long_tail_ratio": args.long_tail_ratio, "hardneg_r_min": args.hardneg_r_min,
        "hardneg_curriculum": args.hardneg_curriculum,
        "deterministic": bool(args.deterministic), "auggen_pairs": args.auggen_pairs,
        "auggen_alpha": args.auggen_alpha, "train_threads": args.train_threads, "worker": args.worker or ("thread" if q else "process"),
        "data_seed": 0,
    }
    for m in s["methods"]:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    for r in s["regimes"]:
        if r not in REGIMES:
            raise SystemExit(f"unknown regime {r!r}; known: {', '.join(REGIMES)}")
    return s


def _refresh_steps(steps: int, refreshes: int) -> list[int]:
    """``refreshes`` steps spread evenly over [5%, 60%] of training (at least step 1)."""
    if refreshes == 1:
        return [max(1, round(0.05 * steps))]
    lo, hi = 0.05 * steps, 0.6 * steps
    return sorted({max(1, round(lo + i * (hi - lo) / (refreshes - 1))) for i in range(refreshes)})


def _confused_pairs(runs: list[dict[str, Any]], test_labels: Any, top: int = 3) -> list[list[int]]:
    """The ``top`` unordered class pairs the baseline runs confuse most on the test set."""
    import numpy as np

    conf = np.zeros((10, 10), dtype=np.int64)
    y = np.asarray(test_labels)
    for r in runs:
        p = np.asarray(r["preds"])
        np.add.at(conf, (y, p), 1)
    sym = conf + conf.T
    np.fill_diagonal(sym, 0)
    iu = np.triu_indices(10, 1)
    order = np.argsort(-sym[iu], kind="stable")[:top]
    return [[int(iu[0][i]), int(iu[1][i]), int(sym[iu][i])] for i in order]


def _pair_accuracy(preds: list[int], test_labels: Any, pairs: list[list[int]]) -> Optional[float]:
    import numpy as np

    y, p = np.asarray(test_labels), np.asarray(preds)
    accs = []
    for a, b, _ in pairs:
        m = (y == a) | (y == b)
        if m.any():
            accs.append(float((p[m] == y[m]).mean()))
    return float(np.mean(accs)) if accs else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from hardneg.data import load_digits

    s = _settings(args)
    info = C.machine_info()
    print(C.header("accuracy", info), flush=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, s["train_threads"]))
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {"benchmark": NAME, "command": C.command_line(NAME), "quick": bool(args.quick),
                               "settings": s, "machine": info, "regimes": {}}
    try:
        for regime in s["regimes"]:
            tr, te = load_digits(size=s["image_size"], seed=s["data_seed"], regime=regime)
            print(f"[{regime}] {len(tr)} train images, class counts {tr.class_counts()}; {len(te)} test", flush=True)
            data: dict[str, Any] = {"train": tr, "test": te, "refresh_steps": _refresh_steps(s["steps"], s["refreshes"])}
            methods = [m for m in s["methods"] if regime in ONLY_IN_REGIMES.get(m, (regime,))]
            needs_gen = any(m in methods for m in GENERATING_METHODS)
            gen_what = None
            if needs_gen:
                data["generator_path"], gen_what = _generator_folder(args, s, regime, tr)
                print(f"[{regime}] generator: {gen_what}", flush=True)
            runs = []
            for seed in s["seeds"]:  # seeds outer, methods inner: drifting machine load hits all methods alike
                for method in methods:
                    r = _one_run(method, regime, seed, data, s)
                    runs.append(r)
                    extra = f", generated {r['generated_images']}" if "generated_images" in r else ""
                    print(f"[{regime}] seed {seed} {method:14s} acc {r['accuracy']:.3f} tail "
                          f"{C.fmt(r['tail_accuracy'])}{extra} ({r['seconds']:.0f}s)", flush=True)
            base = [r for r in runs if r["method"] == "none"] or runs
            pairs = _confused_pairs(base, te.labels)
            for r in runs:
                r["pair_accuracy"] = _pair_accuracy(r["preds"], te.labels, pairs)
            results["regimes"][regime] = {
                "train_size": len(tr), "class_counts": tr.class_counts(), "test_size": len(te),
                "confused_pairs": pairs, "generator": gen_what, "refresh_steps": data["refresh_steps"],
                "summary": _summarise(runs, methods), "runs": runs,
            }
    finally:
        torch.set_num_threads(threads_before)
    results["seconds"] = time.perf_counter() - t_start
    results["table_markdown"] = _table(results)
    print(results["table_markdown"], flush=True)
    return C.finish(args.out, results, _plot(results, args.out))


def _summarise(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        entry = {}
        for key in ("accuracy", "tail_accuracy", "pair_accuracy", "generated_images", "synthetic_used", "seconds"):
            mean, std = C.mean_std([r.get(key) for r in rs])
            entry[key] = {"mean": mean, "std": std}
        entry["n_seeds"] = len(rs)
        out[m] = entry
    return out


def _pm(e: dict[str, Any], scale: float = 100.0) -> str:
    if e["mean"] is None:
        return "-"
    return f"{scale * e['mean']:.1f} ± {scale * e['std']:.1f}"


def _table(results: dict[str, Any]) -> str:
    parts = []
    for regime, reg in results["regimes"].items():
        pairs = ", ".join(f"{a}-{b}" for a, b, _ in reg["confused_pairs"])
        rows = []
        for m, e in reg["summary"].items():
            gen = e["generated_images"]["mean"]
            rows.append([METHOD_LABELS.get(m, m), _pm(e["accuracy"]),
                         _pm(e["tail_accuracy"]) if regime == "long-tail" else "(= overall)",
                         _pm(e["pair_accuracy"]), "-" if gen is None else f"{gen:.0f}",
                         C.fmt(e["seconds"]["mean"], ".0f")])
        parts.append(f"**{regime}** ({reg['train_size']} training images {reg['class_counts']}; "
                     f"most confused pairs by the baseline: {pairs}; {reg['summary'][next(iter(reg['summary']))]['n_seeds']} seeds)\n\n"
                     + C.markdown_table(["method", "accuracy %", "tail-class accuracy %", "confused-pair accuracy %",
                                         "generated images", "run s"], rows))
    return "\n\n".join(parts)


def _plot(results: dict[str, Any], out_dir: str) -> str:
    plt = C.pyplot()
    regimes = list(results["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.2), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        summ = results["regimes"][regime]["summary"]
        methods = list(summ)
        keys = [("accuracy", "overall")] + ([("tail_accuracy", "tail classes")] if regime == "long-tail" else []) \
            + [("pair_accuracy", "confused pairs")]
        width = 0.8 / len(keys)
        for j, (key, label) in enumerate(keys):
            means = [100 * (summ[m][key]["mean"] or 0) for m in methods]
            stds = [100 * (summ[m][key]["std"] or 0) for m in methods]
            ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(len(methods))], means, width, yerr=stds,
                   capsize=2, label=label)
        ax.set_xticks(range(len(methods)), [m.replace("-", "-\n") for m in methods], fontsize=8)
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(f"digits, {regime}")
        lo = min(100 * (summ[m][k]["mean"] or 0) for m in methods for k, _ in keys)
        ax.set_ylim(max(0.0, lo - 15), 100)
        ax.legend(fontsize=8)
    return C.save_figure(fig, os.path.join(out_dir, "accuracy.png"))


main = C.build_main(__name__)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
