"""generator: images/s of each GeNIe generator at r in {0.3, 0.5, 0.8, 1.0}, cost relative to r = 1.

GeNIe runs only the denoising steps with t <= T * r, so the cost of an edit should track r:
``cost(r) / cost(1)`` close to the share of scheduled steps that r keeps (``step fraction``),
plus a fixed part that does not depend on r (VAE encode/decode, prompt encoding, resizing).
The baseline is r = 1 (plain class-conditional / text-to-image sampling), measured in the same
run; the r values are interleaved, their order rotating from repeat to repeat, and each figure is
the median over repeats. A least-squares fit ``seconds = fixed + per_step * steps`` says how
much of the r = 1 cost is fixed.

Generators:

* ``class-conditional``: :class:`~hardneg.generators.class_conditional.ClassConditionalGenerator`,
  the digits model shipped with hardneg when it is present, else a randomly initialised model of
  the default architecture (same cost; says which in the output).
* ``sd-tiny``: :class:`~hardneg.generators.stable_diffusion.StableDiffusionGenerator` over a
  tiny random SD 1.x pipeline built offline (:mod:`benchmarks._tiny_sd`): the code path
  and the r scaling, *not* real Stable Diffusion speed.
* ``sd``: a real checkpoint, with ``--sd-model ID`` (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``)
  on a GPU: ``hardneg bench generator --generators sd --sd-model ID --device cuda --dtype fp16
  --resolution 512 --sd-batch 8`` (DPM-Solver++ 50 steps, CFG 7.5, as in the GeNIe paper).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from benchmarks import _common as C

NAME = "generator"
HELP = "images/s of each generator at r in {0.3,0.5,0.8,1.0}; cost ratio against r = 1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hardneg.commands._args import device  # --device is checked when parsed, as the CLI's commands do

    C.add_common_arguments(p, NAME)
    p.add_argument("--generators", default="class-conditional,sd-tiny",
                   help="comma-separated: class-conditional, sd-tiny, sd (needs --sd-model)")
    p.add_argument("--ratios", default="0.3,0.5,0.8,1.0", help="comma-separated noise ratios r to time")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per r (default: 5; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="inference steps of the full schedule (default: 50; quick 10)")
    p.add_argument("--batch", type=int, default=None, help="images per generate call, class-conditional (default: 16; quick 4)")
    p.add_argument("--sd-batch", type=int, default=None, help="images per generate call, SD (default: 8; quick 2)")
    p.add_argument("--cc-path", default=None,
                   help="class-conditional generator folder (default: the shipped digits model if present)")
    p.add_argument("--sd-model", default=None, help="diffusers checkpoint (hub id or folder) for --generators sd")
    p.add_argument("--resolution", type=int, default=512, help="model resolution for --generators sd")
    p.add_argument("--dtype", default=None, help="fp16 / bf16 / fp32 for --generators sd (default: fp16 on cuda)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 is what the engine's worker process runs a generator with "
                        "on a CPU (HardNegConfig.worker_threads); 0 keeps torch's default")
    p.set_defaults(bench=NAME)


# ---------------------------------------------------------------------------------- generators
def _class_conditional(args: argparse.Namespace, steps: int) -> tuple[Any, str]:
    from hardneg.generators.class_conditional import (
        ClassConditionalConfig, ClassConditionalGenerator, default_digits_generator_path,
    )

    path = args.cc_path or default_digits_generator_path()
    if os.path.exists(os.path.join(path, "config.json")) and not args.quick:
        gen = ClassConditionalGenerator.load(path, device=args.device, num_inference_steps=steps)
        return gen, f"trained model from {path}"
    if args.quick:
        cfg = ClassConditionalConfig(num_classes=10, block_out_channels=(16, 32), norm_num_groups=8,
                                     attention_head_dim=8, num_inference_steps=steps)
        return ClassConditionalGenerator(cfg, None, args.seed).to(args.device), "tiny random model (--quick)"
    cfg = ClassConditionalConfig(num_classes=10, num_inference_steps=steps)
    gen = ClassConditionalGenerator(cfg, None, args.seed).to(args.device)
    return gen, f"randomly initialised default architecture (no trained model at {path}; same cost)"


def _sd_tiny(args: argparse.Namespace, steps: int, tmp: str) -> tuple[Any, str]:
    from benchmarks._tiny_sd import make_tiny_sd_pipeline
    from hardneg.generators.stable_diffusion import StableDiffusionGenerator

    pipe = make_tiny_sd_pipeline(tmp, seed=args.seed)
    gen = StableDiffusionGenerator(pipe, [str(i) for i in range(10)], num_inference_steps=steps,
                                   scheduler="dpm++", device=args.device,
                                   prompt_template="a handwritten {class_name}.")
    return gen, "TINY random SD 1.x pipeline (16 px, toy sizes): code path and r scaling only, not SD speed"


def _sd(args: argparse.Namespace, steps: int) -> tuple[Any, str]:
    from hardneg.generators.stable_diffusion import StableDiffusionGenerator

    if not args.sd_model:
        raise SystemExit("--generators sd needs --sd-model ID (a diffusers checkpoint)")
    gen = StableDiffusionGenerator.from_pretrained(
        args.sd_model, [str(i) for i in range(10)], num_inference_steps=steps, scheduler="dpm++",
        dtype=args.dtype, device=args.device, resolution=args.resolution,
        prompt_template="a photo of the handwritten digit {class_name}.",
    )
    return gen, f"{args.sd_model} at {args.resolution} px, {gen.pipeline.unet.dtype}"


def _steps_for(gen: Any, r: float) -> int:
    if hasattr(gen, "steps_for_ratio"):
        return int(gen.steps_for_ratio(r))
    return len(gen.timesteps_for_ratio(r))


# ---------------------------------------------------------------------------------- measurement
def _measure(gen: Any, sources: Any, labels: Any, ratios: list[float], repeats: int, device: str) -> dict[str, Any]:
    import torch

    targets = (labels + 1) % 10  # GeNIe: every source pulled towards another class
    src, sl, tl = sources.to(device), labels.to(device), targets.to(device)

    def once(r: float, seed: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            gen.generate(src, sl, tl, r, seed=seed)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once(min(ratios), 0)  # warm-up (allocations, lazy initialisation)
    times: dict[float, list[float]] = {r: [] for r in ratios}
    for rep in range(repeats):
        for r in C.rotate(ratios, rep):
            times[r].append(once(r, 1000 + rep))
    base = C.median(times[1.0]) if 1.0 in times else C.median(times[max(ratios)])
    full_steps = _steps_for(gen, 1.0)
    rows = []
    for r in ratios:
        med = C.median(times[r])
        steps = _steps_for(gen, r)
        rows.append({"r": r, "steps": steps, "step_fraction": steps / full_steps, "seconds": C.summary(times[r]),
                     "images_per_s": len(src) / med, "cost_vs_r1": C.ratio(med, base)})
    # seconds = fixed + per_step * steps (least squares over the r values)
    import numpy as np

    xs = np.array([row["steps"] for row in rows], dtype=float)
    ys = np.array([row["seconds"]["median"] for row in rows], dtype=float)
    per_step, fixed = (np.polyfit(xs, ys, 1) if len(set(xs.tolist())) > 1 else (float("nan"), float("nan")))
    return {"batch": len(src), "full_steps": full_steps, "per_r": rows,
            "fit": {"fixed_s": float(fixed), "per_step_s": float(per_step),
                    "fixed_share_of_r1": C.ratio(float(fixed), base)},
            "max_abs_cost_minus_step_fraction": max(abs(row["cost_vs_r1"] - row["step_fraction"]) for row in rows)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from hardneg.data import load_digits

    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    ratios = C.parse_list(args.ratios, float)
    if 1.0 not in ratios:
        ratios.append(1.0)  # the baseline
    repeats = args.repeats or (2 if q else 5)
    steps = args.steps or (10 if q else 50)
    batch = args.batch or (4 if q else 16)
    sd_batch = args.sd_batch or (2 if q else 8)
    names = C.parse_list(args.generators) or []
    info = C.machine_info()
    print(C.header("generator", info), flush=True)
    train, _ = load_digits(size=32, seed=args.seed)
    t_start = time.perf_counter()
    per_gen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "class-conditional":
                gen, what = _class_conditional(args, steps)
                n = batch
            elif name == "sd-tiny":
                gen, what = _sd_tiny(args, steps, tmp)
                n = sd_batch
            elif name == "sd":
                gen, what = _sd(args, steps)
                n = sd_batch
            else:
                raise SystemExit(f"unknown generator {name!r}; use class-conditional, sd-tiny or sd")
            print(f"[{name}] {what}; batch {n}, {steps} steps", flush=True)
            res = _measure(gen, train.images[:n], train.labels[:n], ratios, repeats, args.device)
            res["model"] = what
            per_gen[name] = res
            for row in res["per_r"]:
                print(f"[{name}] r={row['r']:.1f}: {row['images_per_s']:.2f} img/s, cost vs r=1 "
                      f"{row['cost_vs_r1']:.2f} (step fraction {row['step_fraction']:.2f})", flush=True)
            del gen
    results = {"benchmark": NAME, "command": C.command_line(NAME), "quick": bool(q), "machine": info,
               "settings": {"ratios": ratios, "repeats": repeats, "steps": steps, "batch": batch,
                            "sd_batch": sd_batch, "device": args.device},
               "generators": per_gen, "seconds": time.perf_counter() - t_start}
    results["table_markdown"] = _table(per_gen)
    print(results["table_markdown"], flush=True)
    return C.finish(args.out, results, _plot(per_gen, args.out))


def _table(per_gen: dict[str, Any]) -> str:
    rows = []
    for name, res in per_gen.items():
        for row in res["per_r"]:
            rows.append([name, f"{row['r']:.1f}", row["steps"], C.fmt(row["images_per_s"], ".2f"),
                         C.fmt(row["cost_vs_r1"], ".2f"), C.fmt(row["step_fraction"], ".2f")])
        rows.append([name, "fit", "", "", f"fixed {C.fmt(res['fit']['fixed_share_of_r1'], '.0%')} of r=1", ""])
    return C.markdown_table(["generator", "r", "steps", "images/s", "cost vs r=1", "step fraction"], rows)


def _plot(per_gen: dict[str, Any], out_dir: str) -> str:
    plt = C.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in per_gen.items():
        rs = [row["r"] for row in res["per_r"]]
        a1.plot(rs, [row["images_per_s"] for row in res["per_r"]], "o-", label=name)
        a2.plot(rs, [row["cost_vs_r1"] for row in res["per_r"]], "o-", label=f"{name} measured")
        a2.plot(rs, [row["step_fraction"] for row in res["per_r"]], "k:", lw=1)
    a2.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="cost = r")
    a1.set_yscale("log")
    a1.set_xlabel("noise ratio r")
    a1.set_ylabel("images / s")
    a1.set_title("generation throughput")
    a1.legend(fontsize=8)
    a2.set_xlabel("noise ratio r")
    a2.set_ylabel("cost relative to r = 1")
    a2.set_title("cost tracks r (dotted: share of steps kept)")
    a2.legend(fontsize=8)
    return C.save_figure(fig, os.path.join(out_dir, "generator.png"))


main = C.build_main(__name__)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
