"""``hardneg generate``: offline GeNIe hard negatives written as an ImageFolder.

Pairs come from the user (``--pairs 3:8,cat:dog``: class names or indices) or from a quick
classifier trained on the data with the engine mining its confusion (``--pairs auto``, which
also picks each pair's boundary sources). Every image is labelled by its *target* class; a CSV keeps its provenance and
a PNG grid (rows: pairs, columns: r) shows where each boundary flips.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any, Optional

from hardneg.commands._args import HelpFormatter, UsageError, device, parse_pairs, plain, positive_int, ratio_list

DEFAULT_GRID_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate", help="write GeNIe hard negatives for confused (or given) class pairs to an ImageFolder",
        description=plain(__doc__), formatter_class=HelpFormatter,
    )
    p.add_argument("--generator", default="class-conditional", choices=["class-conditional", "stable-diffusion"],
                   help="class-conditional: a small diffusion model of the data; stable-diffusion: your weights")
    p.add_argument("--generator-path", default=None,
                   help="generator folder or hub id (required for stable-diffusion; class-conditional without it: the "
                        "shipped digits model)")
    p.add_argument("--data", default="digits", help="'digits' or an ImageFolder path (root/<class>/<image>)")
    p.add_argument("--image-size", type=positive_int, default=32, help="resolution the data is loaded at (px)")
    p.add_argument("--channels", type=int, default=None, help="1 or 3 for an ImageFolder (3 when not given)")
    p.add_argument("--pairs", default="auto", help="'auto' (mined by a quick classifier) or comma-separated SOURCE:TARGET pairs of class "
                        "names or indices, e.g. 3:8,cat:dog")
    p.add_argument("--top-pairs", type=positive_int, default=5, help="pairs taken with --pairs auto")
    p.add_argument("--ratio", default="0.8", help="noise ratio r in (0, 1], or 'ada' for GeNIe-Ada per source")
    p.add_argument("--ada-grid", type=ratio_list, default="0.5,0.6,0.7,0.8,0.9",
                   help="increasing noise ratios GeNIe-Ada searches with --ratio ada")
    p.add_argument("--per-pair", type=positive_int, default=16, help="images per pair")
    p.add_argument("--classifier", default="resnet10t", help="timm model for --pairs auto / --ratio ada")
    p.add_argument("--classifier-epochs", type=positive_int, default=3,
                   help="training epochs of the quick classifier for --pairs auto / --ratio ada")
    p.add_argument("--batch-size", type=positive_int, default=32, help="generation batch size")
    p.add_argument("--prompt-template", default="a photo of a {class_name}.", help="stable-diffusion only")
    p.add_argument("--steps", type=positive_int, default=None, help="stable-diffusion inference steps (the generator's own when not given)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight (default: the generator's own; SDXL-turbo: 0)")
    p.add_argument("--device", type=device, default="cpu", help="device of the generator and classifier (e.g. cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of sources, noise and the classifier")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def parse_ratio(spec: str) -> Optional[float]:
    """A float in (0, 1], or None for 'ada'."""
    if spec == "ada":
        return None
    try:
        r = float(spec)
    except ValueError:
        raise UsageError(f"--ratio must be a number in (0, 1] or 'ada', got {spec!r}") from None
    if not 0.0 < r <= 1.0:
        raise UsageError(f"--ratio must lie in (0, 1], got {r}")
    return r


def mine_pairs(train_data: Any, model_name: str, epochs: int, top: int, seed: int, progress: bool) -> Any:
    """Train a quick classifier with a mining-only engine; returns the engine (pairs + sources)."""
    from hardneg.config import HardNegConfig
    from hardneg.plugin import HardNeg
    from hardneg.training import make_classifier, train

    model = make_classifier(model_name, num_classes=train_data.num_classes, in_chans=train_data.image_shape[0])
    cfg = HardNegConfig(num_classes=train_data.num_classes, refresh_every=10**9, top_pairs=top,
                        sources_per_pair=64, seed=seed)
    engine = HardNeg(cfg, model=model, class_names=train_data.class_names, dataset=train_data)
    train(model, train_data, train_data, engine=None, epochs=epochs, seed=seed, progress=progress)
    engine.refresh_bank(train_data)  # every sample embedded by the trained model
    engine.refresh()
    return engine


def run(args: argparse.Namespace) -> int:
    import torch

    from hardneg import report
    from hardneg.data import load_data, save_image_folder
    from hardneg.generators import GeneratorError, load_generator
    from hardneg.generators.from_config import check_compatible, generator_info

    ratio = parse_ratio(args.ratio)
    train_data, _ = load_data(args.data, size=args.image_size, channels=args.channels, seed=args.seed)
    names = train_data.class_names
    explicit = None if args.pairs == "auto" else parse_pairs(args.pairs, names)
    kwargs: dict[str, Any] = {}
    if args.generator == "stable-diffusion":
        if args.generator_path is None:
            raise UsageError("--generator stable-diffusion needs --generator-path (a hub id or a local folder)")
        kwargs.update(class_names=names, prompt_template=args.prompt_template, device=args.device)
        if args.steps:
            kwargs["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    kwargs["device"] = args.device
    try:  # the generator must fit the data: classes, channels, the image size it was fitted on
        generator = load_generator(args.generator, args.generator_path, **kwargs)
        check_compatible(generator_info(generator), train_data.num_classes, train_data.image_shape,
                         what=f"--generator {args.generator}")
    except (GeneratorError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = None
    if explicit is None or ratio is None:
        engine = mine_pairs(train_data, args.classifier, args.classifier_epochs, args.top_pairs, args.seed,
                            not args.no_progress)
    if explicit is None:
        mined = engine.confusions(args.top_pairs)
        if not mined:
            raise UsageError("the classifier confuses no class pair; pass --pairs A:B explicitly")
        pairs = [(p.a, p.b) for p in mined]
        sources_of = {(p.a, p.b): p.source_ids for p in mined}
        print("confused pairs: " + ", ".join(f"{names[a]}->{names[b]} {p.score:.3f}" for (a, b), p in zip(pairs, mined)))
    else:
        pairs = explicit
        sources_of = {}
    g = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    rows_csv: list[list[Any]] = []
    grid_rows, grid_labels = [], []
    all_images, all_labels = [], []
    for pair_index, (a, b) in enumerate(pairs):
        ids = sources_of.get((a, b)) or _random_sources(train_data, a, args.per_pair, g)
        ids = [ids[i % len(ids)] for i in range(args.per_pair)]
        sources = train_data.images[torch.as_tensor(ids)]
        seed = args.seed * 1000 + pair_index
        src_lab = torch.full((len(ids),), a, dtype=torch.long)
        tgt_lab = torch.full((len(ids),), b, dtype=torch.long)
        if ratio is None:
            images, ratios = _ada(generator, engine, sources, src_lab, tgt_lab, args, seed)
        else:
            images = _batched(generator, sources, src_lab, tgt_lab, ratio, args.batch_size, seed)
            ratios = [ratio] * len(ids)
        for sid, r in zip(ids, ratios):
            rows_csv.append([sid, names[a], names[b], float(r), seed])
        all_images.append(images)
        all_labels += [b] * len(ids)
        sweep = generator.generate(sources[:1].repeat(len(DEFAULT_GRID_RATIOS), 1, 1, 1),
                                   src_lab[:1].repeat(len(DEFAULT_GRID_RATIOS)), tgt_lab[:1].repeat(len(DEFAULT_GRID_RATIOS)),
                                   list(DEFAULT_GRID_RATIOS), seed=seed)
        grid_rows.append([sources[0]] + list(sweep))
        grid_labels.append(f"{names[a]}→{names[b]}")
        print(f"{names[a]} -> {names[b]}: {len(ids)} images (r {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    paths = save_image_folder(torch.cat(all_images), all_labels, names, os.path.join(args.out, "images"), prefix="genie")
    with open(os.path.join(args.out, "provenance.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "source_id", "source_class", "target_class", "r", "seed"])
        for path, row in zip(paths, rows_csv):
            w.writerow([os.path.relpath(path, args.out)] + row)
    grid = report.plot_image_grid(grid_rows, os.path.join(args.out, "grid.png"), row_labels=grid_labels,
                                  col_labels=["source"] + [f"r={r:.1f}" for r in DEFAULT_GRID_RATIOS],
                                  title="GeNIe boundary sweep (row: source→target)")
    if engine is not None:
        engine.close()
    print(f"wrote {len(paths)} images to {os.path.join(args.out, 'images')}, provenance.csv and {os.path.basename(grid)}")
    return 0


def _random_sources(data: Any, cls: int, n: int, g: Any) -> list[int]:
    import torch

    idx = (data.labels == cls).nonzero().flatten()
    if len(idx) == 0:
        raise UsageError(f"class {data.class_names[cls]!r} has no samples to use as sources")
    return idx[torch.randperm(len(idx), generator=g)[:n]].tolist()


def _batched(generator: Any, sources: Any, src: Any, tgt: Any, ratio: float, batch: int, seed: int) -> Any:
    import torch

    out = []
    for i in range(0, len(sources), batch):
        out.append(generator.generate(sources[i : i + batch], src[i : i + batch], tgt[i : i + batch], ratio,
                                      seed=seed + i))
    return torch.cat(out)


def _ada(generator: Any, engine: Any, sources: Any, src: Any, tgt: Any, args: argparse.Namespace, seed: int) -> Any:
    import torch

    from hardneg.generators.ada import genie_ada

    grid = tuple(args.ada_grid)
    b = int(tgt[0])
    target_mean = torch.as_tensor(engine.bank.class_means()[b]).unsqueeze(0).expand(len(sources), -1)
    result = genie_ada(generator, engine.embed, sources, src, tgt, target_mean, grid=grid, seed=seed)
    return result.images, [float(r) for r in result.ratios]
