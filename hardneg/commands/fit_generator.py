"""``hardneg fit-generator``: train a class-conditional GeNIe generator on your data and score it.

Trains a :class:`~hardneg.generators.class_conditional.ClassConditionalGenerator` (progress bar),
saves it (``unet.safetensors`` + ``config.json``), then trains a small judge CNN on the real data
and prints the class fidelity of plain samples and the GeNIe boundary band of r for one class pair;
the numbers also go to ``report.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Optional

from hardneg.commands._args import HelpFormatter, UsageError, device, parse_pair, plain, positive_int
from hardneg.generators.base import GeneratorError

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fit-generator`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "fit-generator",
        help="train a class-conditional diffusion generator on your data (for GeNIe)",
        description=plain(__doc__),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", required=True,
                   help="'digits' (built in) or an image folder PATH/<class>/<image>")
    p.add_argument("--out", required=True, help="folder to write the generator (and report.json) to")
    p.add_argument("--steps", type=positive_int, default=500, help="training steps")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--ema-decay", type=float, default=0.995,
                   help="EMA of the weights kept as the model; 0 = off")
    p.add_argument("--image-size", type=positive_int, default=16, help="resolution the generator works at (px)")
    p.add_argument("--data-size", type=positive_int, default=32, help="resolution the data is loaded at (px)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="image channels of an image folder (digits: 1)")
    p.add_argument("--block-channels", default="32,64,64",
                   help="UNet channels per resolution level, comma separated")
    p.add_argument("--layers-per-block", type=positive_int, default=1, help="UNet ResNet layers per resolution level")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance at sampling")
    p.add_argument("--inference-steps", type=positive_int, default=25, help="DDIM steps of a full (r = 1) run")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, weights, noise and scoring")
    p.add_argument("--judge-epochs", type=positive_int, default=12, help="epochs of the judge CNN used for scoring")
    p.add_argument("--fidelity-per-class", type=positive_int, default=50, help="samples per class for class fidelity")
    p.add_argument("--pair", default=None,
                   help="class pair SOURCE,TARGET (names or indices) for the boundary band (default: 3,8 on digits, "
                        "else 0,1)")
    p.add_argument("--boundary-sources", type=positive_int, default=32, help="source images for the boundary band")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", type=device, default="cpu", help="device to train and score on (e.g. cuda)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _parse_blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(c) for c in str(text).split(","))
    except ValueError as exc:
        raise GeneratorError(
            f"--block-channels must be comma-separated integers like 32,64,64, got {text!r}") from exc
    if not blocks or min(blocks) < 1:
        raise GeneratorError(f"--block-channels must be positive integers, got {text!r}")
    return blocks


def _parse_pair(text: Optional[str], data_spec: str, class_names: Any) -> tuple[int, int]:
    if text is None:
        return (3, 8) if data_spec == "digits" else (0, 1)
    return parse_pair(text, class_names, option="--pair")


def run(args: argparse.Namespace) -> int:
    """Train, save, score; returns the process exit code (0 on success, 2 on bad input)."""
    import sys

    import torch

    from hardneg.data import DataError, load_data
    from hardneg.generators.class_conditional import ClassConditionalGenerator
    from hardneg.judge import class_fidelity, genie_boundary, judge_accuracy, train_judge

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        blocks = _parse_blocks(args.block_channels)
        train, test = load_data(args.data, size=args.data_size, channels=args.channels, seed=args.seed)
        if args.data == "digits" and args.channels not in (None, 1):
            raise GeneratorError("the built-in digits have 1 channel; drop --channels or pass 1")
        pair = _parse_pair(args.pair, args.data, train.class_names)
        gen = ClassConditionalGenerator.for_dataset(
            train, seed=args.seed, image_size=args.image_size, block_out_channels=blocks,
            layers_per_block=args.layers_per_block, guidance_scale=args.guidance_scale,
            num_inference_steps=args.inference_steps,
            norm_num_groups=max(d for d in range(1, 17) if all(c % d == 0 for c in blocks)),
        ).to(args.device)
    except (GeneratorError, DataError, UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(f"data: {args.data} ({len(train)} training images, {train.num_classes} classes, "
          f"{tuple(train.image_shape)})")
    print(f"generator: {gen}")
    result = gen.fit(train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     progress=not args.no_progress, ema_decay=args.ema_decay)
    print(f"trained {args.steps} steps in {result.seconds:.0f} s, final loss "
          f"{gen.training_info['final_loss']:.4f}")
    gen.training_info["command"] = "hardneg fit-generator " + " ".join(_argv_of(args))
    out = gen.save(args.out)
    print(f"saved to {out}")

    # --- score it with a judge trained on the real data
    t0 = time.perf_counter()
    judge = train_judge(train, epochs=args.judge_epochs, seed=args.seed, device=args.device)
    eval_data = test if test is not None else train
    acc = judge_accuracy(judge, eval_data)
    fidelity, per_class = class_fidelity(gen, judge, args.fidelity_per_class, seed=args.seed, per_class=True)
    a, b = pair
    pool = eval_data.images[eval_data.labels == a][: args.boundary_sources]
    if len(pool) == 0:
        print(f"error: class {a} has no images for the boundary band", file=sys.stderr)
        return 2
    curve = genie_boundary(gen, judge, pool, a, b, DEFAULT_RATIOS, seed=args.seed)
    band = curve.flip_band()
    print(f"judge accuracy on {'test' if test is not None else 'training'} data: {acc:.3f}")
    print(f"class fidelity: {fidelity:.3f}  (per class: {', '.join(f'{p:.2f}' for p in per_class)})")
    print(curve.format())
    if band is None:
        print(f"boundary band: P({b}) stays below 0.5 for every r on the grid")
    else:
        print(f"boundary band: the label flips {a} -> {b} for r in ({band[0]:.2f}, {band[1]:.2f}]")
    report = {
        "data": args.data, "generator": gen.config.to_dict(), "training": gen.training_info,
        "parameters": gen.num_parameters(), "judge_accuracy": acc, "class_fidelity": fidelity,
        "class_fidelity_per_class": per_class, "pair": [a, b], "boundary": curve.rows(),
        "flip_band": list(band) if band is not None else None,
        "evaluation_seconds": round(time.perf_counter() - t0, 1),
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The options of this run as command-line flags (recorded in config.json for reproduction)."""
    skip = {"func", "command", "verbose", "no_progress"}
    flags = []
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None:
            continue
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


# Below this class fidelity (share of plain samples a judge trained on the real data reads as the
# class they were asked for) a generator's hard negatives are more label noise than signal.
LOW_FIDELITY = 0.5


def fit_for_data(train: Any, out: str, steps: int, image_size: int, seed: int = 0, device: str = "cpu",
                 progress: bool = True, inference_steps: int = 25, block_channels: tuple[int, ...] = (32, 64, 64),
                 batch_size: int = 128, lr: float = 2e-3) -> Any:
    """Fit a class-conditional generator on ``train`` as ``fit-generator`` does and save it to ``out``."""
    from hardneg.generators.class_conditional import ClassConditionalGenerator

    gen = ClassConditionalGenerator.for_dataset(
        train, seed=seed, image_size=image_size, block_out_channels=block_channels,
        num_inference_steps=inference_steps,
        norm_num_groups=max(d for d in range(1, 17) if all(c % d == 0 for c in block_channels)),
    ).to(device)
    result = gen.fit(train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    print(f"generator: trained {steps} steps in {result.seconds:.0f} s, final loss "
          f"{gen.training_info['final_loss']:.4f}; saved to {gen.save(out)}")
    return gen


def score_fidelity(gen: Any, train: Any, test: Any = None, per_class: int = 50, judge_epochs: int = 12,
                   seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Class fidelity of ``gen`` by a judge CNN trained on ``train``; printed, with a warning when low.

    Returns ``{"judge_accuracy", "class_fidelity", "class_fidelity_per_class", "low"}``.
    """
    from hardneg.judge import class_fidelity, judge_accuracy, train_judge

    judge = train_judge(train, epochs=judge_epochs, seed=seed, device=device)
    acc = judge_accuracy(judge, test if test is not None else train)
    fidelity, per = class_fidelity(gen, judge, per_class, seed=seed, per_class=True)
    print(f"generator: class fidelity {fidelity:.3f} (per class: {', '.join(f'{p:.2f}' for p in per)}); "
          f"judge accuracy on real {'test' if test is not None else 'training'} images {acc:.3f}")
    low = fidelity < LOW_FIDELITY
    if low:
        import sys

        print(f"warning: class fidelity {fidelity:.2f} is low (< {LOW_FIDELITY}): a judge trained on your data "
              "recognises few of the generator's samples as their class, so its hard negatives may carry wrong "
              "labels. Fit longer (--fit-steps), give it more images per class, use a Stable Diffusion generator "
              "(--generator stable-diffusion --generator-path FOLDER), or train without generation "
              "(--no-generation).", file=sys.stderr, flush=True)
    return {"judge_accuracy": acc, "class_fidelity": fidelity, "class_fidelity_per_class": per, "low": low}
