"""Shared pieces of the benchmarks: argument handling, timing statistics, machine facts, output files.

Timing rules every benchmark follows (the machines they run on are shared and noisy):

* the baseline is measured in the same run, interleaved with what is compared to it;
* each figure is the median of repeated measurements, and reported as a ratio to the baseline;
* nothing here asserts a timing: the figures go to JSON, a plot and ``benchmarks/README.md``.

Only the standard library is imported at module level so ``hardneg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

from hardneg.report import pyplot, save_figure, write_json  # noqa: F401  (used as C.pyplot, C.save_figure)

DEFAULT_OUT_ROOT = os.path.join("hardneg-out", "bench")


# ---------------------------------------------------------------------------------- arguments
def add_common_arguments(parser: argparse.ArgumentParser, name: str, seed: bool = True) -> None:
    """``--out``, ``--quick`` and ``--seed``: every benchmark has them (``seed=False``: it has ``--seeds``)."""
    parser.add_argument("--out", default=os.path.join(DEFAULT_OUT_ROOT, name),
                        help="output folder for results.json and the plot")
    parser.add_argument("--quick", action="store_true",
                        help="a small, fast version (seconds; for tests and smoke checks)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of data, models and measurements")


def parse_list(spec: Optional[str], cast: Callable[[str], Any] = str) -> Optional[list[Any]]:
    """``"1,2,3"`` -> [1, 2, 3] with ``cast``; None or '' -> None."""
    if spec is None or str(spec).strip() == "":
        return None
    return [cast(s.strip()) for s in str(spec).split(",") if s.strip()]


def parse_size(token: str) -> int:
    """``"10k"`` -> 10000, ``"1M"`` -> 1000000, ``"2500"`` -> 2500 (``"0"``: none)."""
    t = token.strip().lower().replace("_", "")
    mult = 1
    if t.endswith("k"):
        mult, t = 1_000, t[:-1]
    elif t.endswith("m"):
        mult, t = 1_000_000, t[:-1]
    value = float(t) * mult
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole size >= 0: {token!r}")
    return int(value)


def human_size(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def build_main(module_name: str) -> Callable[[Optional[Sequence[str]]], int]:
    """A ``main(argv)`` for the benchmark module ``module_name`` (``python -m benchmarks.<module>``)."""

    def main(argv: Optional[Sequence[str]] = None) -> int:
        module = sys.modules[module_name]
        from hardneg.commands._args import HelpFormatter, plain

        parser = argparse.ArgumentParser(
            prog=f"python -m benchmarks {module.NAME}", description=plain(module.__doc__),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(parser)
        args = parser.parse_args(argv)
        results = module.run(args)
        return int(results.get("exit_code", 0)) if isinstance(results, dict) else 0

    return main


# ---------------------------------------------------------------------------------- statistics
def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, mean, min, max and count of repeated measurements (NaN-free input)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "q1": None, "q3": None, "mean": None, "min": None, "max": None, "n": 0}
    q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[i] for i in (0, 2)) if len(vals) > 1 else (vals[0], vals[0])
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "mean": statistics.fmean(vals),
            "min": min(vals), "max": max(vals), "n": len(vals)}


def median(values: Sequence[float]) -> float:
    return float(statistics.median([float(v) for v in values])) if values else float("nan")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or not b > 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return float(a) / float(b)


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (0 for one value) ignoring None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


@contextmanager
def timed(store: list[float]) -> Iterator[None]:
    """Append the wall time (s) of the ``with`` body to ``store``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store.append(time.perf_counter() - t0)


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` rotated by ``k`` (interleaving order changes from repeat to repeat)."""
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


# ---------------------------------------------------------------------------------- machine facts
def machine_info() -> dict[str, Any]:
    """The facts needed to read a timing: CPU, cores, load, library versions, accelerator."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    try:
        info["affinity_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        pass
    try:
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["memory_gb"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    for mod in ("faiss", "timm", "diffusers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or None


# ---------------------------------------------------------------------------------- output
def command_line(name: str, argv: Optional[Sequence[str]] = None) -> str:
    """How this run was started (recorded in the JSON so a figure can be reproduced)."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join(argv)


def write_results(out_dir: str, results: dict[str, Any], filename: str = "results.json") -> str:
    return write_json(results, os.path.join(out_dir, filename))


def finish(out_dir: str, results: dict[str, Any], plot_file: str) -> dict[str, Any]:
    """Record the run's files (``results.json`` and ``plot_file``), write the JSON, say where; returns ``results``."""
    results["files"] = [os.path.join(out_dir, "results.json"), plot_file]
    write_results(out_dir, results)
    print(f"wrote {', '.join(results['files'])}", flush=True)
    return results


def bar_plot(values: dict[str, Optional[float]], ylabel: str, title: str, path: str) -> str:
    """One bar per name (missing values left out); returns ``path``."""
    plt = pyplot()
    names = [k for k, v in values.items() if v is not None]
    fig, ax = plt.subplots(figsize=(max(3.0, 1.1 * len(names) + 1), 3.2))
    ax.bar(names, [values[k] for k in names])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=30)
    return save_figure(fig, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are shown as given (format them before)."""
    out = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join("" if v is None else str(v) for v in r) + " |")
    return "\n".join(out)


def fmt(value: Optional[float], spec: str = ".3f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def header(title: str, info: dict[str, Any]) -> str:
    load = info.get("load_average_1_5_15")
    return (f"== {title} ==\nmachine: {info.get('cpu_model')} | {info.get('cpu_count')} cores | "
            f"torch threads {info.get('torch_threads')} | load avg {load} | cuda {info.get('cuda')}")


# ---------------------------------------------------------------------------------- synthetic data
def clustered_embeddings(
    n: int,
    dim: int = 512,
    num_classes: int = 10,
    seed: int = 0,
    subclusters: int = 8,
    intrinsic_dim: int = 16,
    confusable: Sequence[tuple[int, int]] = ((3, 8), (4, 9), (1, 7)),
    boundary_fraction: float = 0.15,
    chunk: int = 100_000,
) -> tuple[Any, Any]:
    """Class-like clustered unit vectors standing in for a trained classifier's embeddings.

    Each class has a centre; each of its ``subclusters`` modes sits near that centre and spreads
    along its own ``intrinsic_dim``-dimensional subspace (embeddings live near low-dimensional
    manifolds, which is what makes approximate search work on them), plus a little isotropic
    noise. The classes of each ``confusable`` pair get centres close to each other, and a
    ``boundary_fraction`` of samples is pulled part-way towards another class's mode (mostly the
    confusable partner), so the confusion graph has pairs to find. Returns ``(vectors float32
    (n, dim), labels int64 (n,))`` as numpy arrays, L2-normalised, generated in chunks with torch.
    """
    with torch_threads(1):  # many small matmuls: one thread is several times faster on a busy box
        return _clustered(n, dim, num_classes, seed, subclusters, intrinsic_dim, confusable, boundary_fraction, chunk)


def _clustered(n: int, dim: int, num_classes: int, seed: int, subclusters: int, intrinsic_dim: int,
               confusable: Sequence[tuple[int, int]], boundary_fraction: float, chunk: int) -> tuple[Any, Any]:
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(int(seed))
    centres = torch.randn(num_classes, dim, generator=g)
    partner = torch.full((num_classes,), -1, dtype=torch.long)
    for a, b in confusable:
        if a < num_classes and b < num_classes:
            centres[b] = 0.7 * centres[a] + 0.7 * centres[b]
            partner[a], partner[b] = b, a
    n_modes = num_classes * subclusters
    modes = centres.repeat_interleave(subclusters, 0) + 0.7 * torch.randn(n_modes, dim, generator=g)
    bases = torch.randn(n_modes, intrinsic_dim, dim, generator=g) / math.sqrt(intrinsic_dim)
    vectors = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        counts = torch.bincount(torch.randint(0, n_modes, (m,), generator=g), minlength=n_modes)
        mode = torch.repeat_interleave(torch.arange(n_modes), counts)
        z = torch.randn(m, intrinsic_dim, generator=g)
        x = torch.empty(m, dim)
        offset = 0
        for k, c in enumerate(counts.tolist()):  # each mode spreads along its own subspace
            x[offset:offset + c] = modes[k] + 1.1 * (z[offset:offset + c] @ bases[k])
            offset += c
        perm = torch.randperm(m, generator=g)  # ids in random mode order
        x, mode = x[perm], mode[perm]
        cls = mode // subclusters
        # Boundary samples: pulled part of the way towards a mode of another class (the confusable
        # partner when the class has one), so neighbourhoods overlap as they do in a real model.
        pulled = torch.rand(m, generator=g) < boundary_fraction
        other = (cls + 1 + torch.randint(0, num_classes - 1, (m,), generator=g)) % num_classes
        use_partner = (partner[cls] >= 0) & (torch.rand(m, generator=g) < 0.8)
        other = torch.where(use_partner, partner[cls], other)
        other_mode = other * subclusters + torch.randint(0, subclusters, (m,), generator=g)
        t = (0.3 + 0.4 * torch.rand(m, 1, generator=g)) * pulled.unsqueeze(1)
        x = (1 - t) * x + t * modes[other_mode]
        x = x + 0.25 * torch.randn(m, dim, generator=g)
        x = torch.nn.functional.normalize(x, dim=1)
        vectors[start:start + m] = x.numpy()
        labels[start:start + m] = cls.numpy()
    return vectors, labels


def upsert_in_chunks(bank: Any, ids: Any, vectors: Any, labels: Any, cuts: Sequence[int] = (),
                     chunk: int = 20_000) -> None:
    """Insert many vectors into an :class:`~hardneg.bank.EmbeddingBank` in chunks of ``chunk``.

    ``EmbeddingBank.upsert`` costs O(batch^2) for new ids (it counts the new ids seen so far with
    ``new_mask.sum()`` inside its per-id loop): one call with 1M new ids would take hours, 20k-id
    chunks cost ~0.5 s each. ``cuts`` are extra chunk boundaries (e.g. the IVF threshold).
    """
    n = len(ids)
    bounds = sorted({0, n, *[c for c in cuts if 0 < c < n], *range(0, n, chunk)})
    for a, b in zip(bounds[:-1], bounds[1:]):
        bank.upsert(ids[a:b], vectors[a:b], labels[a:b])


def resident_anon_bytes() -> Optional[int]:
    """This process's resident anonymous memory (Linux ``RssAnon``: heap and private mappings, not
    file pages), after a garbage collection and ``malloc_trim``, so freed memory the allocator can
    return is not counted; None where ``/proc`` or glibc is not there. What a build really holds,
    next to what ``memory_bytes()`` counts (allocator slack and growth capacity included)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, AttributeError, ValueError):
        return None
    return None


@contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Temporarily run torch with ``n`` intra-op threads (None: leave as is)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile_top(profiler: Any, limit: int = 12) -> list[dict[str, Any]]:
    """The ``limit`` functions with the largest cumulative time in a ``cProfile.Profile``."""
    import pstats

    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{os.path.basename(filename)}:{line}({func})", "calls": nc,
                     "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    rows.sort(key=lambda r: -r["cumtime_s"])
    return rows[:limit]
