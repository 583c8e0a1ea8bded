"""``hardneg demo``: the whole online GeNIe loop on the built-in digits or on your image folder.

A timm classifier trains on the data while the engine mines its confused pairs; a background
worker (its own process with a bounded thread budget) turns boundary samples of those pairs into
hard negatives with a class-conditional diffusion model of the data (digits: shipped with the
package; --data PATH: fitted on your images first, its class fidelity printed) or with your
Stable Diffusion weights (--generator stable-diffusion --generator-path FOLDER); an adaptive
curriculum moves r.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

from hardneg.commands._args import HelpFormatter, UsageError, device, plain, positive_int


def add_parser(subparsers: Any) -> None:
    from hardneg.curriculum import CURRICULA  # the one list of curriculum names (a light module)

    p = subparsers.add_parser(
        "demo",
        help="train a classifier on the built-in digits or your image folder with online GeNIe hard negatives",
        description=plain(__doc__),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="hardneg-out/demo", help="output folder for plots, JSON and checkpoints")
    p.add_argument("--data", default="digits",
                   help="'digits' (built in) or your image folder: PATH/train/<class>/* with PATH/test/<class>/*, "
                        "or PATH/<class>/* (a stratified 20%% of every class is held out for testing)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="channels of an image folder (default: 1 when its images are grayscale, else 3)")
    p.add_argument("--generator", choices=["class-conditional", "stable-diffusion"], default="class-conditional",
                   help="class-conditional: a small diffusion model of the data; stable-diffusion: your weights")
    p.add_argument("--generator-path", default=None,
                   help="stable-diffusion: a local diffusers folder or hub id (required); class-conditional: a "
                        "folder written by fit-generator (default: shipped for digits, fitted for --data)")
    p.add_argument("--generator-steps", type=positive_int, default=None,
                   help="denoising steps of a full schedule (default: the generator's own)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight (default: the generator's own; SDXL-turbo: 0)")
    p.add_argument("--prompt-template", default=None,
                   help="stable-diffusion prompt with a {class_name} field (default: 'a photo of a {class_name}.')")
    p.add_argument("--generator-size", type=int, default=None,
                   help="resolution a generator fitted on --data works at (default: the image size, at most 16)")
    p.add_argument("--fidelity-per-class", type=int, default=20,
                   help="samples per class scored by the judge after fitting a generator on --data")
    p.add_argument("--device", type=device, default="cpu", help="device of the classifier and the generator (e.g. cuda)")
    p.add_argument("--epochs", type=positive_int, default=8, help="training epochs")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many training steps (quick look)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the classifier")
    p.add_argument("--model", default="resnet10t", help="timm model name (built from config, no download)")
    p.add_argument("--image-size", type=positive_int, default=32, help="resolution the data is loaded at (px)")
    p.add_argument("--regime", choices=["balanced", "long-tail", "few-shot"], default="balanced",
                   help="long-tail: imbalance 20 (class 0 head, 9 tail); few-shot: 10 per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, model, engine and generator")
    p.add_argument("--generator-dir", default=None,
                   help="class-conditional generator folder (default: the one shipped with hardneg; "
                        "trained into this folder first if it holds none)")
    p.add_argument("--fit-steps", type=positive_int, default=1500, help="generator training steps if it must be trained")
    p.add_argument("--no-generation", action="store_true", help="only mine confusion, generate nothing")
    p.add_argument("--curriculum", default="adaptive",
                   choices=[c for c in CURRICULA if c != "band"],  # band needs a teacher, the demo keeps none
                   help="how the GeNIe noise ratio r moves: a time schedule (constant, linear, cosine, step), per pair from "
                        "the model's accuracy on fresh negatives (adaptive) or picked per source (ada)")
    p.add_argument("--worker", choices=["process", "thread"], default="process",
                   help="where the generator runs: its own process or a thread of this one")
    p.add_argument("--worker-threads", type=positive_int, default=1, help="torch CPU threads of the generator worker")
    p.add_argument("--synthetic-fraction", type=float, default=0.25,
                   help="generated hard negatives per batch, as a share of its size (once the buffer holds some)")
    p.add_argument("--refresh-every", type=positive_int, default=10,
                   help="training steps between confusion refreshes (each requests new images)")
    p.add_argument("--images-per-refresh", type=positive_int, default=48,
                   help="hard negatives requested per refresh")
    p.add_argument("--deterministic", action="store_true",
                   help="repeat a seeded run exactly: refresh inline, hand images over only at refresh boundaries")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run from OUT/checkpoint.pt (if it exists) up to --epochs: model, "
                        "optimiser, LR schedule, data order and engine; give the same arguments as that run")
    p.add_argument("--stop-after-epochs", type=positive_int, default=None,
                   help="stop after this many epochs as if interrupted (checkpoint kept; finish with --resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from hardneg.checkpoint import CheckpointError, load_safe, save_atomic
    from hardneg.config import ConfigError, HardNegConfig
    from hardneg.confusion import describe_pairs
    from hardneg.data import DataError, detect_channels, load_digits, load_train_test_folder
    from hardneg._optional import MissingExtraError
    from hardneg.worker import WorkerStartError
    from hardneg.plugin import HardNeg, HardNegError
    from hardneg import report
    from hardneg.training import make_classifier, set_seed, train

    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "checkpoint.pt")
    state = None
    if args.resume and os.path.exists(ckpt):  # read (and check) it before any work: a bad file fails at once
        state = _load_checkpoint(ckpt, args)
    set_seed(args.seed)
    try:
        if args.data == "digits":
            train_data, test_data = load_digits(size=args.image_size, seed=args.seed, regime=args.regime)
        else:
            if args.regime != "balanced":
                raise DataError("--regime applies to the built-in digits; an image folder is used as it is")
            channels = args.channels or detect_channels(args.data)
            train_data, test_data = load_train_test_folder(args.data, size=args.image_size, channels=channels,
                                                           seed=args.seed)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = train_data.class_names
    label = f"digits ({args.regime})" if args.data == "digits" else args.data
    print(f"{label}: {len(train_data)} train / {len(test_data)} test, {train_data.num_classes} classes "
          f"{tuple(train_data.image_shape)}, class counts {train_data.class_counts()}")
    generator = None
    by_name: dict[str, Any] = {}  # a generator the engine builds in its worker from the config
    generator_report: dict[str, Any] = {}
    if not args.no_generation:
        if args.generator == "stable-diffusion":
            if args.generator_path is None:
                print("error: --generator stable-diffusion needs --generator-path (a local diffusers folder or hub "
                      "id)", file=sys.stderr)
                return 2
            by_name = dict(generator="stable-diffusion", generator_path=args.generator_path,
                           prompt_template=args.prompt_template)
            print(f"generator: Stable Diffusion from {args.generator_path}")
        elif args.generator_path is not None:
            by_name = dict(generator="class-conditional", generator_path=args.generator_path)
            print(f"generator: loading {args.generator_path}")
        elif args.data == "digits":
            generator = _load_or_fit_generator(args, train_data)
        else:
            folder = args.generator_dir or os.path.join(args.out, "generator")
            if not os.path.exists(os.path.join(folder, "config.json")):
                generator_report = _fit_for_folder(args, train_data, test_data, folder)
            else:
                print(f"generator: loading {folder}")
            by_name = dict(generator="class-conditional", generator_path=folder)
        if by_name:
            by_name.update(generator_steps=args.generator_steps, guidance_scale=args.guidance_scale)
    steps_per_epoch = -(-len(train_data) // args.batch_size)
    cfg = HardNegConfig(
        num_classes=train_data.num_classes, refresh_every=args.refresh_every, top_pairs=4, knn_k=10,
        sources_per_pair=24, images_per_refresh=args.images_per_refresh, generation_batch=16,
        worker_backend=args.worker, worker_threads=args.worker_threads, queue_size=6,
        synthetic_fraction=args.synthetic_fraction, buffer_size=1024, curriculum=args.curriculum,
        r_start=0.7, r_end=0.4, r_min=0.3, r_max=0.9, adaptive_step=0.05, adaptive_min_samples=16,
        total_steps=args.epochs * steps_per_epoch, freshness_half_life=4 * steps_per_epoch, seed=args.seed,
        deterministic=args.deterministic, worker_device=args.device, **by_name,
    )
    model = make_classifier(args.model, num_classes=train_data.num_classes, in_chans=train_data.image_shape[0])
    try:
        engine = HardNeg(cfg, model=model, class_names=names, dataset=train_data, generator=generator)
    except (ConfigError, HardNegError, WorkerStartError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    epochs_log: list[dict[str, Any]] = []
    resume_state = None
    seconds_before = 0.0
    if state is not None:
        try:
            engine.load_state_dict(state["engine"])
        except HardNegError as exc:
            engine.close()
            raise CheckpointError(ckpt, f"does not fit this run: {exc}") from None
        resume_state = state["training"]
        epochs_log = list(resume_state["history"])
        seconds_before = float(state.get("seconds", 0.0))
        print(f"resumed from {ckpt}: epoch {resume_state['epoch']}, step {resume_state['step']}", flush=True)

    def on_epoch(m: Any) -> None:
        epochs_log.append(m.to_dict())
        pairs = engine.confusions(4)
        pa = f"{m.pair_accuracy:.3f}" if m.pair_accuracy is not None else "  -  "
        r = f"{m.mean_r:.2f}" if m.mean_r is not None else " - "
        ips = f"{m.worker_images_per_s:.1f}" if m.worker_images_per_s else "-"
        tail = f" tail-acc {m.tail_accuracy:.3f}" if m.tail_accuracy is not None else ""
        print(f"epoch {m.epoch:2d} | loss {m.loss:.3f} | test-acc {m.test_accuracy:.3f} | pair-acc {pa}{tail} | "
              f"synthetic used {m.synthetic_used:4d} | mean r {r} | worker img/s {ips} | "
              f"engine {100 * (m.engine_fraction or 0):.1f}% of step time", flush=True)
        print(f"          confused: {describe_pairs(pairs, names)}", flush=True)

    def on_checkpoint(training: dict[str, Any]) -> None:
        save_atomic({"format": CHECKPOINT_FORMAT, "args": _run_args(args), "training": training,
                          "engine": engine.state_dict(), "seconds": seconds_before + time.perf_counter() - t_start},
                         ckpt)

    try:
        train(model, train_data, test_data, engine=engine, epochs=args.epochs, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, progress=not args.no_progress, on_epoch=on_epoch,
              max_steps=args.max_steps, on_checkpoint=on_checkpoint, resume_state=resume_state,
              stop_after_epoch=args.stop_after_epochs, device=args.device)
        engine.collect()
    finally:
        engine.close()
    _write_outputs(args, engine, epochs_log, names, seconds_before + time.perf_counter() - t_start, report,
                   generator_report)
    return 0


CHECKPOINT_FORMAT = 2
# Arguments a resumed run must share with the interrupted one (they shape the schedule, data and engine).
_RESUME_ARGS = ("data", "channels", "generator", "generator_path", "epochs", "max_steps", "batch_size", "lr", "model",
                "image_size", "regime", "seed", "no_generation", "curriculum", "synthetic_fraction", "refresh_every",
                "images_per_refresh", "deterministic")


def _run_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in _RESUME_ARGS}


def _load_checkpoint(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Read a demo checkpoint (tensors and numbers only) and check it belongs to this run's arguments."""
    from hardneg.checkpoint import CheckpointError, load_safe

    state = load_safe(path, what="hardneg demo checkpoint", keys=("engine",))
    if state.get("format") != CHECKPOINT_FORMAT or "training" not in state:
        raise CheckpointError(path, f"was written by an older hardneg demo (format {state.get('format')!r}, expected "
                                    f"{CHECKPOINT_FORMAT}) that saved no optimiser or LR schedule, so training cannot "
                                    "continue from it; start afresh without --resume")
    saved, now = state.get("args", {}), _run_args(args)
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in _RESUME_ARGS if saved.get(k) != now[k]]
    if differ:
        raise UsageError(f"cannot resume from {path}: the interrupted run used " + ", ".join(differ)
                         + "; resume with the same arguments")
    return state


def _fit_for_folder(args: argparse.Namespace, train_data: Any, test_data: Any, folder: str) -> dict[str, Any]:
    """Fit a class-conditional generator on the user's training split (as fit-generator does), score it."""
    from hardneg.commands.fit_generator import fit_for_data, score_fidelity

    size = args.generator_size or min(min(train_data.image_shape[1:]), 16)
    print(f"generator: none in {folder}; fitting one on {len(train_data)} training images "
          f"({args.fit_steps} steps at {size} px)", flush=True)
    gen = fit_for_data(train_data, folder, steps=args.fit_steps, image_size=size, seed=args.seed, device=args.device,
                       progress=not args.no_progress, inference_steps=args.generator_steps or 25)
    scores = score_fidelity(gen, train_data, test_data, per_class=args.fidelity_per_class, seed=args.seed,
                            device=args.device)
    return {"folder": folder, **scores}


def _load_or_fit_generator(args: argparse.Namespace, train_data: Any) -> Any:
    from hardneg.generators.class_conditional import ClassConditionalGenerator, default_digits_generator_path

    folder = args.generator_dir or default_digits_generator_path()
    if os.path.exists(os.path.join(folder, "config.json")):
        print(f"generator: loading {folder}")
        return ClassConditionalGenerator.load(folder)
    print(f"generator: none in {folder}; training one on the digits ({args.fit_steps} steps)")
    gen = ClassConditionalGenerator.for_dataset(train_data, seed=args.seed)
    gen.fit(train_data, steps=args.fit_steps, seed=args.seed, progress=not args.no_progress)
    gen.save(folder)
    return gen


def _write_outputs(args: argparse.Namespace, engine: Any, epochs_log: list, names: list, seconds: float,
                   report: Any, generator_report: Optional[dict] = None) -> None:
    out = args.out
    stats = engine.stats()
    files = [report.plot_confusion_over_time(engine.confusion.history, os.path.join(out, "confusion_over_time.png"), names),
             report.plot_confusion_matrix(engine.confusion.matrix(), os.path.join(out, "confusion_matrix.png"), names),
             report.plot_training_curves(epochs_log, os.path.join(out, "training_curves.png"))]
    if not args.no_generation:
        files.append(report.plot_ratio_over_time(engine.curriculum.history, os.path.join(out, "ratio_over_time.png"), names))
        grid = _negatives_grid(engine)
        if grid is not None:
            rows, row_labels = grid
            files.append(report.plot_image_grid(rows, os.path.join(out, "hard_negatives.png"), row_labels=row_labels,
                                                title="generated hard negatives (row: source→target; sorted by r)"))
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "seconds": seconds,
        "epochs": epochs_log,
        "final_test_accuracy": epochs_log[-1]["test_accuracy"] if epochs_log else None,
        "top_pairs": [[p.a, p.b, p.score] for p in engine.confusions(8)],
        "stats": stats,
        "generator": generator_report or None,
        "files": files,
    }
    files.append(report.write_json(summary, os.path.join(out, "summary.json")))
    print(f"done in {seconds:.0f} s; wrote " + ", ".join(os.path.basename(f) for f in files) + f" to {out}")


def _negatives_grid(engine: Any, per_row: int = 8) -> Any:
    """Rows of buffered negatives per pair (most stocked pairs first), sorted by r, labelled 'a→b'."""
    stored = engine.buffer.snapshot()  # row i: the i-th stored sample (never a slot number)
    if stored is None:
        return None
    by_pair: dict[tuple[int, int], list[int]] = {}
    for i, (a, b) in enumerate(stored.pairs.tolist()):
        by_pair.setdefault((a, b), []).append(i)
    rows, labels = [], []
    for (a, b), members in sorted(by_pair.items(), key=lambda kv: -len(kv[1]))[:6]:
        members = sorted(members, key=lambda i: float(stored.ratios[i]))
        pick = [members[round(j * (len(members) - 1) / max(per_row - 1, 1))] for j in range(min(per_row, len(members)))]
        rows.append([stored.images[i] for i in pick])
        rs = [float(stored.ratios[i]) for i in pick]
        labels.append(f"{engine.class_names[a]}→{engine.class_names[b]}\nr {min(rs):.2f}-{max(rs):.2f}")
    return rows, labels
