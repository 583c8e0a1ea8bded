"""The prepared GPU check: one command, correctness first, then each GPU figure against its baseline.

A session lent a GPU has about 15 minutes of device time in all, so this check is ready and tested
on the CPU before (``--device cpu --quick`` runs in the test suite): on one GPU it finishes in
under 8 minutes (``--budget``, default 480 s; every section has its own budget and its own hard
limit). Each section is timed and printed as

* ``PASS``: every check held, within its time budget;
* ``FAIL``: a check did not hold or the section raised (the error is recorded; the next section
  runs anyway);
* ``SLOW``: every check held but the section ran past its budget;
* ``SKIP``: it could not run here (the reason is given: no CUDA, no FAISS GPU build, total budget
  spent, not selected with ``--sections``).

``results.json`` under ``--out`` is rewritten after every section (a crash or a kill keeps what
ran); the exit code is 1 when a section failed. Sections, in order:

correctness
  ``environment``      versions (torch, CUDA, cuDNN, diffusers, timm, FAISS, accelerate), GPUs, FAISS GPUs.
  ``engine_loop``      the engine with the shipped digits generator on the device: fp32, bf16
                       autocast, and a bf16 model with ``curriculum="ada"``; images arrive, losses
                       stay finite; on CUDA the synchronising calls of ``mix`` and ``observe`` are
                       counted (``torch.cuda.set_sync_debug_mode``; the worker thread's own are not).
  ``worker_backends``  thread and process workers on the device with per-sample r: same images
                       from both and from a direct call, r carried through; memory before / after
                       (the process child with a 30% GPU share, ``memory_fraction``).
  ``sd_tiny``          the tiny random SD pipeline in fp32 / fp16 / bf16, and compiled with a
                       warm-up over several batch sizes: the recompile count must be 0.
  ``bank``             bank upsert, confusion refresh and kNN with k > 2048 on the GPU index vs
                       the CPU one (same top pairs, same neighbours).
  ``accelerate_bf16``  ``HardNegAccelerate`` in one process with ``mixed_precision="bf16"``.

timings (each against its baseline, measured in the same run)
  ``resnet50_step``    a timm resnet50 step at 224 px (bf16 autocast, channels-last) with the
                       generator working on its own CUDA stream (thread) or process, vs the plain step.
  ``generator_speed``  the class-conditional generator's images/s in fp32 vs fp16 / bf16
                       autocast and compiled (``torch.compile``, recompiles counted).
  ``faiss_1m``         FAISS GPU vs CPU exact kNN over 1M vectors (skipped without a FAISS GPU build).
  ``engine_sync``      the engine's synchronous time per step (observe + mix) on the device vs a
                       plain training step.

``--quick`` shrinks every size so the whole check runs in about a minute on a CPU; CUDA-only parts
are skipped with the reason, everything else must pass.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from benchmarks import _common as C

NAME = "gpu"
HELP = "the prepared GPU check (<= 8 min): correctness first, then GPU timings vs baselines; PASS/FAIL/SLOW/SKIP"


class Skip(Exception):
    """Raised by a section that cannot run here; the message is the reason."""


@dataclass
class Section:
    name: str
    fn: Callable[["Ctx"], dict[str, Any]]
    budget_s: float  # on one GPU (full sizes)
    quick_budget_s: float  # --quick on a CPU


@dataclass
class Ctx:
    """What every section gets: the device, the sizes to use, a scratch folder."""

    device: Any  # torch.device
    quick: bool
    seed: int
    tmp: str
    steps: int  # denoising steps of the shipped generator

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def size(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------ helpers
def _digits(n: int, seed: int) -> Any:
    from hardneg.data import load_digits

    train, _ = load_digits(size=32, seed=seed)
    return train.subset(range(min(n, len(train))))


def _generator_factory(ctx: Ctx) -> Any:
    from hardneg.generators import load_generator

    return functools.partial(load_generator, "class-conditional", None, device=str(ctx.device),
                             num_inference_steps=ctx.steps)


def _gpu_memory(ctx: Ctx) -> Optional[dict[str, float]]:
    """Allocated / reserved by this process and device-wide used memory (GB); None on a CPU."""
    if not ctx.cuda:
        return None
    import torch

    free, total = torch.cuda.mem_get_info(ctx.device)
    gb = 2.0 ** 30
    return {"allocated_gb": torch.cuda.memory_allocated(ctx.device) / gb,
            "reserved_gb": torch.cuda.memory_reserved(ctx.device) / gb, "device_used_gb": (total - free) / gb}


def _faiss_gpus() -> int:
    try:
        import faiss

        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # noqa: BLE001 - no FAISS, or a CPU build
        return 0


@contextmanager
def _count_syncs(counts: dict[str, int], key: str, enabled: bool) -> Iterator[None]:
    """Count synchronising CUDA calls made by *this* thread in the ``with`` body (sync debug mode 'warn')."""
    if not enabled:
        yield
        return
    import torch

    me = threading.current_thread()
    old_show = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" in str(message).lower() and threading.current_thread() is me:
            counts[key] = counts.get(key, 0) + 1
        elif "synchroniz" not in str(message).lower():
            old_show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old_show


def _median(values: list[float]) -> Optional[float]:
    return float(statistics.median(values)) if values else None


def _timed(ctx: Ctx, fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------ correctness
def environment(ctx: Ctx) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"machine": C.machine_info(), "torch_cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "faiss_gpus": _faiss_gpus()}
    for mod in ("accelerate", "transformers", "diffusers", "timm", "faiss"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"missing ({type(exc).__name__})"
    if torch.cuda.is_available():
        env["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})
        env["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    return {"metrics": env, "checks": {"device_available": (not ctx.cuda) or torch.cuda.is_available()},
            "summary": f"torch {torch.__version__}, cuda {torch.version.cuda}, faiss GPUs {env['faiss_gpus']}"}


def engine_loop(ctx: Ctx) -> dict[str, Any]:
    import torch

    from hardneg import HardNeg, HardNegConfig
    from hardneg.training import make_classifier, soft_cross_entropy

    data = _digits(ctx.size(2000, 200), ctx.seed)
    batch = ctx.size(64, 16)
    variants = [("fp32", None, False, "constant"), ("bf16-autocast", torch.bfloat16, False, "constant"),
                ("bf16-model-ada", torch.bfloat16, True, "ada")]
    metrics: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    for name, amp, bf16_model, curriculum in variants:
        torch.manual_seed(ctx.seed)
        model = make_classifier(ctx.size("resnet18", "test_resnet"), 10, in_chans=1).to(ctx.device)
        if bf16_model:
            model = model.to(torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        cfg = HardNegConfig(num_classes=10, generator="class-conditional", worker_device=str(ctx.device),
                            generator_steps=ctx.steps, images_per_refresh=8, generation_batch=8, top_pairs=2,
                            refresh_every=10**6, curriculum=curriculum, seed=ctx.seed)
        counts: dict[str, int] = {}
        losses: list[float] = []
        g = torch.Generator().manual_seed(ctx.seed)
        with HardNeg(cfg, model=model, class_names=data.class_names, dataset=data) as engine:

            def step(i: int) -> None:
                idx = torch.randint(0, len(data), (batch,), generator=g)
                x, y = data.images[idx].to(ctx.device), data.labels[idx].to(ctx.device)
                with _count_syncs(counts, "mix", ctx.cuda):
                    xm, ym, w = engine.mix(x, y)
                with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                    logits = model(xm.to(next(model.parameters()).dtype))
                    loss = (w * soft_cross_entropy(logits.float(), ym)).sum() / w.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with _count_syncs(counts, "observe", ctx.cuda):
                    engine.observe(labels=ym, logits=logits, ids=idx)
                losses.append(float(loss.detach()))

            for i in range(ctx.size(6, 3)):
                step(i)
            engine.refresh()
            arrived = engine.wait_for_images(1, timeout=ctx.size(120, 120))
            steps_after = ctx.size(20, 3)
            counts.clear()
            for i in range(steps_after):
                step(i)
            stats = engine.stats()
        worker = stats.get("worker") or {}
        checks[f"{name}: images arrived"] = bool(arrived)
        checks[f"{name}: no worker failures"] = worker.get("failures", 0) == 0
        checks[f"{name}: finite losses"] = all(math.isfinite(v) for v in losses)
        metrics[name] = {"synthetic_used": stats.get("synthetic_used"), "images_received": stats.get("images_received"),
                         "worker": {k: worker.get(k) for k in ("requests_completed", "images_produced", "failures",
                                                                "mean_generation_s")},
                         "syncs_per_step": ({k: v / steps_after for k, v in counts.items()} if ctx.cuda else
                                            "not measured on a CPU")}
    syncs = {n: m["syncs_per_step"] for n, m in metrics.items()}
    return {"metrics": metrics, "checks": checks,
            "summary": f"syncs per step (mix/observe): {syncs}" if ctx.cuda else "CPU: syncs not measured",
            "notes": [] if ctx.cuda else ["sync debug mode needs CUDA: sync counts not measured"]}


def worker_backends(ctx: Ctx) -> dict[str, Any]:
    import torch

    from hardneg.worker import GenerationRequest, GenerationWorker

    data = _digits(64, ctx.seed)
    n = ctx.size(16, 4)
    ratios = torch.linspace(0.3, 1.0, n)
    src_labels = data.labels[:n]
    req = GenerationRequest(request_id=1, pair=(0, 1), source_ids=torch.arange(n), sources=data.images[:n].clone(),
                            source_labels=src_labels, target_labels=(src_labels + 1) % 10, ratios=ratios, step=0,
                            seed=ctx.seed + 7)
    direct = _generator_factory(ctx)()
    with torch.no_grad():
        ref = direct.generate(req.sources.to(ctx.device), req.source_labels.to(ctx.device),
                              req.target_labels.to(ctx.device), req.ratios, seed=req.seed).float().cpu()
    del direct
    metrics: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    images: dict[str, Any] = {}
    for backend in ("thread", "process"):
        fraction = 0.3 if (backend == "process" and ctx.cuda) else None
        before = _gpu_memory(ctx)
        t0 = time.perf_counter()
        worker = GenerationWorker(_generator_factory(ctx), backend=backend, device=ctx.device, memory_fraction=fraction,
                                  request_timeout=300)
        try:
            worker.start()
            worker.wait_until_ready(300)
            ready_s = time.perf_counter() - t0
            during = _gpu_memory(ctx)
            worker.submit(req)
            results = worker.drain(300)
            stats = worker.stats()
        finally:
            worker.close(timeout=30)
        after = _gpu_memory(ctx)
        ok = len(results) == 1
        checks[f"{backend}: one result"] = ok
        checks[f"{backend}: no failures"] = stats.get("failures", 1) == 0
        if ok:
            out = results[0]
            images[backend] = out.images.float()
            checks[f"{backend}: shape and finite"] = (tuple(out.images.shape) == tuple(req.sources.shape)
                                                      and bool(torch.isfinite(out.images).all()))
            checks[f"{backend}: per-sample r carried"] = bool(torch.allclose(out.ratios, ratios))
            # same seed, same device: equal up to kernel noise (a wrong r or seed differs by ~0.1-1)
            checks[f"{backend}: equals a direct call"] = bool(torch.allclose(out.images.float(), ref, atol=1e-2))
        metrics[backend] = {"ready_s": ready_s, "memory_fraction": fraction, "gpu_memory_before": before,
                            "gpu_memory_with_worker": during, "gpu_memory_after_close": after,
                            "generation_s": stats.get("mean_generation_s")}
    if len(images) == 2:
        checks["thread == process"] = bool(torch.allclose(images["thread"], images["process"], atol=1e-2))
    return {"metrics": metrics, "checks": checks,
            "summary": ", ".join(f"{b} ready {m['ready_s']:.1f}s" for b, m in metrics.items())}


def sd_tiny(ctx: Ctx) -> dict[str, Any]:
    import torch

    from benchmarks._tiny_sd import make_tiny_sd_pipeline
    from hardneg.generators.stable_diffusion import StableDiffusionGenerator

    classes = ["cat", "dog", "bird"]
    n = ctx.size(8, 4)
    g = torch.Generator().manual_seed(ctx.seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    src, tgt = torch.zeros(n, dtype=torch.long), torch.arange(n) % 3
    r = torch.linspace(0.4, 1.0, n)
    steps = ctx.size(20, 4)
    metrics: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    notes: list[str] = []
    outputs: dict[str, Any] = {}
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    except ImportError:
        pass
    for dtype in ("fp32", "fp16", "bf16"):
        if dtype == "fp16" and not ctx.cuda:
            notes.append("fp16 skipped on a CPU (half-precision CPU kernels are incomplete)")
            continue
        pipe = make_tiny_sd_pipeline(os.path.join(ctx.tmp, f"sd-{dtype}"), seed=ctx.seed)
        gen = StableDiffusionGenerator(pipe, classes, num_inference_steps=steps, device=ctx.device, dtype=dtype)
        xs = x.to(ctx.device)
        gen.generate(xs, src, tgt, r, seed=1)  # warm-up
        times = _timed(ctx, lambda: outputs.__setitem__(dtype, gen.generate(xs, src, tgt, r, seed=1).float().cpu()),
                       ctx.size(3, 1))
        out = outputs[dtype]
        checks[f"{dtype}: finite, shape, range"] = (tuple(out.shape) == tuple(x.shape) and bool(torch.isfinite(out).all())
                                                   and float(out.min()) >= -1e-3 and float(out.max()) <= 1 + 1e-3)
        metrics[dtype] = {"images_per_s": n / _median(times), "unet_dtype": str(gen.dtype),
                          "max_abs_diff_vs_fp32": (float((out - outputs["fp32"]).abs().max()) if "fp32" in outputs
                                                   else None)}
    # compile: one shape for any batch (padded to max_batch_size), compiled at warm-up
    backend = True if ctx.cuda else "eager"  # inductor on a CPU needs a C++ toolchain and minutes
    pipe = make_tiny_sd_pipeline(os.path.join(ctx.tmp, "sd-compile"), seed=ctx.seed)
    gen = StableDiffusionGenerator(pipe, classes, num_inference_steps=steps, device=ctx.device,
                                   dtype="fp16" if ctx.cuda else "fp32", compile=backend, max_batch_size=4)
    t0 = time.perf_counter()
    gen.warmup()
    warm_s = time.perf_counter() - t0
    first = gen.compiles or 0
    per_batch = {}
    for b in (1, 3, 4, 7, 2):
        xb = torch.rand(b, 3, 16, 16, generator=g).to(ctx.device)
        rb = torch.linspace(0.3, 1.0, b)
        times = _timed(ctx, lambda: gen.generate(xb, src[:1].repeat(b), tgt[:1].repeat(b), rb, seed=2), 1)
        per_batch[b] = b / times[0]
    recompiles = (gen.compiles or 0) - first
    checks["compiled at warm-up"] = first >= 1
    checks["no recompiles over batch sizes 1, 3, 4, 7, 2"] = recompiles == 0
    metrics["compile"] = {"backend": str(backend), "warmup_s": warm_s, "graphs": first, "recompiles": recompiles,
                          "images_per_s_by_batch": per_batch}
    return {"metrics": metrics, "checks": checks, "notes": notes,
            "summary": f"recompiles {recompiles}, compile warm-up {warm_s:.1f}s"}


def bank(ctx: Ctx) -> dict[str, Any]:
    import numpy as np
    import torch

    from hardneg.bank import EmbeddingBank
    from hardneg.confusion import ConfusionGraph

    n, dim, k_big = ctx.size(200_000, 5_000), ctx.size(128, 32), 3000
    x, y = C.clustered_embeddings(n, dim=dim, seed=ctx.seed)
    ids = np.arange(n)
    gpus = _faiss_gpus()
    kinds = [("cpu", False)] + ([("gpu", True)] if gpus and ctx.cuda else [])
    metrics: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    found: dict[str, Any] = {}
    q = torch.from_numpy(x[:64])
    for kind, use_gpu in kinds:
        b = EmbeddingBank(dim, 10, index="flat", use_gpu=use_gpu)
        t0 = time.perf_counter()
        C.upsert_in_chunks(b, ids, x, y)
        upsert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        C.upsert_in_chunks(b, ids[:10_000], x[:10_000], y[:10_000])  # updates of known ids
        update_s = time.perf_counter() - t0
        graph = ConfusionGraph(10, knn_k=10)
        t0 = time.perf_counter()
        graph.refresh(b)
        refresh_s = time.perf_counter() - t0
        pairs = [(p.a, p.b) for p in graph.top_pairs(3)]
        t0 = time.perf_counter()
        scores, nn_ids = b.search(q, k_big)
        search_s = time.perf_counter() - t0
        nn_ids = np.asarray(nn_ids)
        checks[f"{kind}: k={k_big} search shape"] = tuple(nn_ids.shape) == (64, k_big)
        found[kind] = (pairs, nn_ids)
        metrics[kind] = {"n": n, "dim": dim, "upsert_s": upsert_s, "update_10k_s": update_s, "refresh_s": refresh_s,
                         "search_64q_k3000_s": search_s, "top_pairs": pairs}
    notes = []
    if "gpu" in found:
        checks["gpu top pairs == cpu"] = found["gpu"][0] == found["cpu"][0]
        a, b_ = found["cpu"][1], found["gpu"][1]
        overlap = float(np.mean([len(set(a[i]) & set(b_[i])) / k_big for i in range(len(a))]))
        checks["gpu k=3000 neighbours == cpu (>= 99%)"] = overlap >= 0.99
        metrics["gpu_vs_cpu"] = {"neighbour_overlap": overlap,
                                 "refresh_speedup": C.ratio(metrics["cpu"]["refresh_s"], metrics["gpu"]["refresh_s"]),
                                 "upsert_speedup": C.ratio(metrics["cpu"]["upsert_s"], metrics["gpu"]["upsert_s"])}
    else:
        notes.append("GPU half skipped: " + ("no CUDA device" if not ctx.cuda else "no FAISS GPU build "
                                             "(pip install 'hardneg[gpu]', remove faiss-cpu)"))
    return {"metrics": metrics, "checks": checks, "notes": notes,
            "summary": (f"refresh speed-up {metrics['gpu_vs_cpu']['refresh_speedup']:.2f}x" if "gpu" in found
                        else "CPU only")}


def accelerate_bf16(ctx: Ctx) -> dict[str, Any]:
    import torch

    from hardneg import HardNegConfig
    from hardneg.training import make_classifier, soft_cross_entropy

    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
    except ImportError as exc:
        raise Skip(f"accelerate is not installed ({exc}): pip install 'hardneg[accelerate]'") from exc
    from hardneg.integrations.accelerate import HardNegAccelerate

    AcceleratorState._reset_state(True)
    try:
        acc = Accelerator(mixed_precision="bf16", cpu=not ctx.cuda)
        device = str(acc.device)
        data = _digits(ctx.size(1000, 200), ctx.seed)
        torch.manual_seed(ctx.seed)
        model = make_classifier(ctx.size("resnet18", "test_resnet"), 10, in_chans=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model, opt = acc.prepare(model, opt)
        losses, dtypes = [], set()
        conv = next(m for m in acc.unwrap_model(model).modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda mod, inp, out: dtypes.add(str(out.dtype)))  # prepare() casts logits to fp32
        cfg = HardNegConfig(num_classes=10, generator="class-conditional", worker_device=str(acc.device),
                            generator_steps=ctx.steps, images_per_refresh=8, generation_batch=8, top_pairs=2,
                            refresh_every=10**6, seed=ctx.seed)
        hn = HardNegAccelerate(acc, cfg, model=model, class_names=data.class_names, dataset=data)
        g = torch.Generator().manual_seed(ctx.seed)
        try:
            def step() -> None:
                idx = torch.randint(0, len(data), (ctx.size(64, 16),), generator=g)
                x, y = data.images[idx].to(acc.device), data.labels[idx].to(acc.device)
                xm, ym, w = hn.mix(x, y)
                with acc.autocast():
                    logits = model(xm)
                    loss = (w * soft_cross_entropy(logits.float(), ym)).sum() / w.sum()
                acc.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
                hn.observe(labels=ym, logits=logits, ids=idx)
                losses.append(float(loss.detach()))

            for _ in range(ctx.size(6, 3)):
                step()
            hn.engine.refresh()
            # images reach the buffer through the adapter's mix (it shares finished results): train on
            # until some arrived, with a deadline rather than a step count
            deadline = time.monotonic() + 120
            while len(hn.engine.buffer) == 0 and time.monotonic() < deadline:
                step()
                time.sleep(0.05)
            arrived = len(hn.engine.buffer) > 0
            for _ in range(ctx.size(10, 3)):
                step()
            stats = hn.stats()
        finally:
            hn.close()
    finally:
        AcceleratorState._reset_state(True)
    checks = {"images arrived": bool(arrived), "finite losses": all(math.isfinite(v) for v in losses),
              "convolutions in bf16 under autocast": "torch.bfloat16" in dtypes}
    return {"metrics": {"conv_output_dtypes": sorted(dtypes), "synthetic_used": stats.get("synthetic_used"),
                        "device": device}, "checks": checks, "summary": f"conv outputs {sorted(dtypes)}"}


# ------------------------------------------------------------------------------ timings
def resnet50_step(ctx: Ctx) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from hardneg.training import make_classifier
    from hardneg.worker import GenerationRequest, GenerationWorker

    name, size, batch = ctx.size(("resnet50", 224, 64), ("test_resnet", 32, 8))
    steps, rounds = ctx.size(15, 2), ctx.size(2, 1)
    torch.manual_seed(ctx.seed)
    model = make_classifier(name, 1000 if not ctx.quick else 10, in_chans=3).to(ctx.device)
    if ctx.cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=ctx.device)
    if ctx.cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=ctx.device)
    data = _digits(64, ctx.seed)
    gen_n = ctx.size(16, 2)

    def request(i: int) -> GenerationRequest:
        labels = data.labels[:gen_n]
        return GenerationRequest(request_id=i, pair=(0, 1), source_ids=torch.arange(gen_n),
                                 sources=data.images[:gen_n].clone(), source_labels=labels,
                                 target_labels=(labels + 1) % 10, ratios=torch.full((gen_n,), 0.8), step=i, seed=i)

    def train_steps(worker: Optional[GenerationWorker]) -> float:
        ticket = [0]

        def one() -> None:
            if worker is not None:
                if worker.stats()["requests_queued"] < 2:
                    ticket[0] += 1
                    worker.submit(request(ticket[0]))
                worker.poll()
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            one()  # warm-up (cuDNN autotune, the worker's first request)
        ctx.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        ctx.sync()
        return (time.perf_counter() - t0) / steps

    workers: dict[str, Optional[GenerationWorker]] = {"plain": None}
    metrics: dict[str, Any] = {}
    try:
        for backend in ("thread", "process"):
            w = GenerationWorker(_generator_factory(ctx), backend=backend, device=ctx.device, queue_size=4,
                                 request_timeout=300)
            w.start()
            w.wait_until_ready(300)
            workers[backend] = w
        times: dict[str, list[float]] = {k: [] for k in workers}
        train_steps(None)  # first-use costs (allocator, autograd graph) before any measured round
        for rep in range(rounds):
            for key in C.rotate(list(workers), rep):
                times[key].append(train_steps(workers[key]))
        for w in workers.values():  # (untimed) train on until each generator has made an image: on a
            deadline = time.monotonic() + 300  # busy machine the short timed rounds may end first
            while w is not None and not w.stats().get("images_produced") and time.monotonic() < deadline:
                train_steps(w)
        for key, w in workers.items():
            if w is not None:
                s = w.stats()
                metrics[f"{key}_generated_images"] = s.get("images_produced")
                metrics[f"{key}_failures"] = s.get("failures")
    finally:
        for w in workers.values():
            if w is not None:
                w.close(timeout=30)
    plain = _median(times["plain"])
    metrics.update({"model": name, "image_size": size, "batch": batch, "steps_per_round": steps, "rounds": rounds,
                    "step_s": {k: _median(v) for k, v in times.items()},
                    "ratio_thread_stream": C.ratio(_median(times["thread"]), plain),
                    "ratio_process": C.ratio(_median(times["process"]), plain)})
    checks = {"generator produced images during training": all(
        (metrics.get(f"{b}_generated_images") or 0) > 0 for b in ("thread", "process")),
        "no worker failures": all(metrics.get(f"{b}_failures") == 0 for b in ("thread", "process"))}
    return {"metrics": metrics, "checks": checks,
            "summary": f"step ratio thread {C.fmt(metrics['ratio_thread_stream'], '.2f')}, "
                       f"process {C.fmt(metrics['ratio_process'], '.2f')} ({name} {size}px batch {batch})"}


def generator_speed(ctx: Ctx) -> dict[str, Any]:
    import torch

    data = _digits(256, ctx.seed)
    n = ctx.size(64, 4)
    src, labels = data.images[:n].to(ctx.device), data.labels[:n].to(ctx.device)
    targets = (labels + 1) % 10
    repeats = ctx.size(3, 1)
    gen = _generator_factory(ctx)()
    metrics: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    notes: list[str] = []

    def run(amp: Any) -> Any:
        with torch.no_grad(), torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
            return gen.generate(src, labels, targets, 1.0, seed=3)

    variants = [("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
    for key, amp in variants:
        if key == "fp16" and not ctx.cuda:
            notes.append("fp16 autocast skipped on a CPU")
            continue
        out = run(amp)
        checks[f"{key}: finite"] = bool(torch.isfinite(out).all())
        metrics[key] = {"images_per_s": n / _median(_timed(ctx, lambda: run(amp), repeats))}
    gen.compile(True if ctx.cuda else "eager", batch=2 * n)  # one UNet call per step (guidance doubles rows)
    t0 = time.perf_counter()
    gen.warmup()
    warm_s = time.perf_counter() - t0
    first = gen.compiles or 0
    run(None)
    metrics["compiled_fp32"] = {"images_per_s": n / _median(_timed(ctx, lambda: run(None), repeats)),
                                "warmup_s": warm_s, "recompiles": (gen.compiles or 0) - first}
    checks["compiled: no recompiles"] = metrics["compiled_fp32"]["recompiles"] == 0
    base = metrics["fp32"]["images_per_s"]
    for key in ("fp16", "bf16", "compiled_fp32"):
        if key in metrics:
            metrics[key]["speedup_vs_fp32"] = C.ratio(metrics[key]["images_per_s"], base)
    return {"metrics": metrics, "checks": checks, "notes": notes,
            "summary": ", ".join(f"{k} {C.fmt(m.get('speedup_vs_fp32', 1.0), '.2f')}x" for k, m in metrics.items())}


def faiss_1m(ctx: Ctx) -> dict[str, Any]:
    if not ctx.cuda:
        raise Skip("needs CUDA (--device cpu)")
    if not _faiss_gpus():
        raise Skip("no FAISS GPU build (faiss.get_num_gpus() == 0): pip install 'hardneg[gpu]' and remove faiss-cpu")
    import faiss
    import numpy as np
    import torch

    n, dim, nq, k = 1_000_000, 256, 4096, 10
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    xb = torch.nn.functional.normalize(torch.randn(n, dim, device=ctx.device, generator=g), dim=1).cpu().numpy()
    xq = np.ascontiguousarray(xb[:nq] + 0.01 * np.random.default_rng(ctx.seed).standard_normal((nq, dim), dtype=np.float32))
    res = faiss.StandardGpuResources()
    faiss.knn_gpu(res, xq[:16], xb, k, metric=faiss.METRIC_INNER_PRODUCT)  # warm-up (upload, kernels)
    t0 = time.perf_counter()
    _, gi = faiss.knn_gpu(res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    gpu_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ci = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    cpu_s = time.perf_counter() - t0
    top1 = float(np.mean(gi[:, 0] == ci[:, 0]))
    metrics = {"n": n, "dim": dim, "queries": nq, "k": k, "gpu_s": gpu_s, "cpu_s": cpu_s,
               "speedup": C.ratio(cpu_s, gpu_s), "top1_agreement": top1}
    return {"metrics": metrics, "checks": {"GPU top-1 == CPU top-1 (>= 99%)": top1 >= 0.99},
            "summary": f"GPU {C.fmt(metrics['speedup'], '.1f')}x faster ({gpu_s:.2f}s vs {cpu_s:.2f}s)"}


def engine_sync(ctx: Ctx) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from hardneg import HardNeg, HardNegConfig

    n_bank, dim, batch = ctx.size(100_000, 2_000), ctx.size(512, 64), ctx.size(256, 16)
    steps = ctx.size(30, 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, dim), torch.nn.ReLU(),
                                torch.nn.Linear(dim, 10)).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, 32, 32, device=ctx.device)
    y = torch.randint(0, 10, (batch,), device=ctx.device)
    emb, labels = C.clustered_embeddings(n_bank, dim=dim, seed=ctx.seed)
    cfg = HardNegConfig(num_classes=10, seed=ctx.seed)
    sync_times, plain_times = [], []
    with HardNeg(cfg, model=model) as engine:
        e, lab = torch.from_numpy(emb), torch.from_numpy(labels)
        for s in range(0, n_bank, 10_000):  # prefill the bank (the cost of a long run's bank)
            engine.observe(embeddings=e[s:s + 10_000].to(ctx.device), labels=lab[s:s + 10_000].to(ctx.device),
                           ids=torch.arange(s, min(s + 10_000, n_bank)))
        engine.wait_for_refresh(120)
        g = torch.Generator().manual_seed(ctx.seed)
        for i in range(steps + 2):
            ids = torch.randint(0, n_bank, (batch,), generator=g)
            ctx.sync()
            t0 = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctx.sync()
            t1 = time.perf_counter()
            xm, ym, w = engine.mix(x, y)
            engine.observe(labels=y, logits=logits.detach(), ids=ids)
            ctx.sync()
            t2 = time.perf_counter()
            if i >= 2:
                plain_times.append(t1 - t0)
                sync_times.append(t2 - t1)
    metrics = {"bank": n_bank, "dim": dim, "batch": batch, "plain_step_s": _median(plain_times),
               "engine_sync_s": _median(sync_times), "sync_fraction": C.ratio(_median(sync_times), _median(plain_times))}
    return {"metrics": metrics, "checks": {"measured": bool(sync_times)},
            "summary": f"engine sync {C.fmt(metrics['engine_sync_s'], '.4f')}s per step = "
                       f"{C.fmt(metrics['sync_fraction'], '.2f')} of a plain step"}


SECTIONS = (
    Section("environment", environment, 10, 10),
    Section("engine_loop", engine_loop, 60, 60),
    Section("worker_backends", worker_backends, 45, 60),
    Section("sd_tiny", sd_tiny, 60, 30),
    Section("bank", bank, 30, 15),
    Section("accelerate_bf16", accelerate_bf16, 30, 30),
    Section("resnet50_step", resnet50_step, 70, 60),
    Section("generator_speed", generator_speed, 60, 40),
    Section("faiss_1m", faiss_1m, 30, 5),
    Section("engine_sync", engine_sync, 25, 15),  # budgets sum to 420 s of the 480 s total
)


# ------------------------------------------------------------------------------ the runner
def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, NAME)
    p.add_argument("--device", default="auto", help="where to run: auto (cuda when available), cuda, cuda:N or cpu")
    p.add_argument("--budget", type=float, default=480.0,
                   help="total seconds; once spent, the remaining sections are skipped (each also has its own)")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of: " + ", ".join(s.name for s in SECTIONS) + " (default: all)")
    p.add_argument("--generator-steps", type=int, default=None,
                   help="denoising steps of the shipped generator (default 25; 2 with --quick)")


def _run_section(section: Section, ctx: Ctx, budget: float, hard_limit: float) -> dict[str, Any]:
    """Run one section in a daemon thread (a hung one is abandoned at ``hard_limit``); never raises."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["out"] = section.fn(ctx)
        except Skip as exc:
            box["skip"] = str(exc)
        except BaseException as exc:  # noqa: BLE001 - recorded as FAIL, the next section runs
            box["error"] = f"{type(exc).__name__}: {exc}"
            box["traceback"] = traceback.format_exc()[-4000:]

    t0 = time.perf_counter()
    thread = threading.Thread(target=body, name=f"gpu-check-{section.name}", daemon=True)
    thread.start()
    thread.join(hard_limit)
    seconds = time.perf_counter() - t0
    rec: dict[str, Any] = {"seconds": round(seconds, 2), "budget_s": budget}
    if thread.is_alive():
        rec.update(status="FAIL", error=f"still running after its hard limit of {hard_limit:.0f}s (abandoned)")
    elif "skip" in box:
        rec.update(status="SKIP", reason=box["skip"])
    elif "error" in box:
        rec.update(status="FAIL", error=box["error"], traceback=box["traceback"])
    else:
        out = box["out"]
        failed = [k for k, ok in out.get("checks", {}).items() if not ok]
        rec.update({k: v for k, v in out.items() if k in ("metrics", "checks", "notes", "summary")})
        if failed:
            rec.update(status="FAIL", error="checks failed: " + "; ".join(failed))
        else:
            rec["status"] = "SLOW" if seconds > budget else "PASS"
    return rec


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    return dev


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _resolve_device(args.device)
    wanted = None if not args.sections else [s.strip() for s in str(args.sections).split(",") if s.strip()]
    unknown = sorted(set(wanted or ()) - {s.name for s in SECTIONS})
    if unknown:
        raise SystemExit(f"unknown --sections {unknown}; known: {[s.name for s in SECTIONS]}")
    steps = args.generator_steps or (2 if args.quick else 25)
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {"benchmark": NAME, "quick": bool(args.quick), "device": str(device),
                               "machine": C.machine_info(), "command": C.command_line(NAME),
                               "budget_s": args.budget, "sections": {}}
    path = os.path.join(args.out, "results.json")
    print(C.header(f"hardneg GPU check on {device}", results["machine"]), flush=True)
    start = time.perf_counter()
    # On a CPU, one torch thread: tiny models lose up to 100x to thread contention on a busy box.
    threads = 1 if device.type == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="hardneg-gpu-check-") as tmp, C.torch_threads(threads):
        ctx = Ctx(device=device, quick=bool(args.quick), seed=int(args.seed), tmp=tmp, steps=steps)
        for section in SECTIONS:
            budget = section.quick_budget_s if args.quick else section.budget_s
            spent = time.perf_counter() - start
            if wanted is not None and section.name not in wanted:
                rec = {"status": "SKIP", "reason": "not selected with --sections", "seconds": 0.0, "budget_s": budget}
            elif spent + min(budget, 10.0) > args.budget:
                rec = {"status": "SKIP", "reason": f"total budget spent ({spent:.0f}s of {args.budget:.0f}s)",
                       "seconds": 0.0, "budget_s": budget}
            else:
                hard = max(10.0, min(2.0 * budget + 30.0, args.budget - spent))
                rec = _run_section(section, ctx, budget, hard)
            results["sections"][section.name] = rec
            detail = rec.get("summary") or rec.get("reason") or rec.get("error") or ""
            print(f"[{rec['status']:4s}] {section.name:16s} {rec['seconds']:7.1f}s / {budget:4.0f}s  {detail}"[:400],
                  flush=True)
            results["total_s"] = round(time.perf_counter() - start, 2)
            C.write_results(args.out, results)  # incrementally: a kill keeps what ran
    counts = {s: sum(r["status"] == s for r in results["sections"].values()) for s in ("PASS", "FAIL", "SLOW", "SKIP")}
    results["counts"] = counts
    results["exit_code"] = 1 if counts["FAIL"] else 0
    print(f"{counts} in {results['total_s']:.0f}s -> {path}", flush=True)
    plot = C.bar_plot({name: rec["seconds"] for name, rec in results["sections"].items()}, "seconds",
                      f"GPU check on {device}: section times", os.path.join(args.out, "gpu_check.png"))
    return C.finish(args.out, results, plot)


main = C.build_main(__name__)
