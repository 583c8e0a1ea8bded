"""bank: exact flat vs IVF vs HNSW vs brute-force torch for the embedding bank (d = 512, cosine).

For each bank size N it builds every index over the same class-like clustered synthetic
embeddings (:func:`hardneg.benchmarks._common.clustered_embeddings`) and measures, against the
exact flat bank (the baseline, measured in the same run, repeats interleaved):

* build time (upserting all N vectors in 20k chunks, as a growing bank fills; IVF is trained
  when the bank first holds N/5 vectors) and the time to replace a batch of 128 stored vectors
  (what every training step does; for a bank that queues IVF work, upsert + ``flush()``);
* query throughput (queries/s, k nearest neighbours, batches of ``--queries``);
* IVF recall@k against exact search and the nprobe trade-off curve; the smallest nprobe that
  reaches ``--target-recall`` is the operating point reported;
* the confusion refresh (:meth:`hardneg.confusion.ConfusionGraph.refresh`, default 20k kNN
  queries) over each index. Exact refreshes above ``--exact-refresh-max`` are estimated from the
  measured IVF refresh plus the exact-minus-IVF per-query search time (marked ``estimated``).

Brute-force torch is ``queries @ bank.T`` + ``topk`` in 64k-row blocks (no index to build).

More sections (``--sections``, default ``main`` = the comparison above):

* ``exact``: the confusion refresh and a 16-query training-time search over an exact flat bank at
  ``--exact-sizes``, as hardneg runs them (chunks FAISS computes with BLAS, fewer queries by
  torch's matrix product: :func:`hardneg.bank.exact_knn`) against FAISS called as before (the
  refresh's 64-query chunks, which FAISS >= 1.15 answers with its sequential loop below
  ``n_queries * d = 128,000``), repeats interleaved; the confusion scores must agree to within one
  neighbour of one query (float32 rounding may swap a 10th and 11th neighbour).

* ``sharded``: the bank sharded over W gloo processes (``bank_sharding="id-mod"``,
  :mod:`hardneg.sharded_bank`) at W = ``--shard-worlds`` on this machine's CPUs: per-rank bank
  memory, and the refresh's wall time and per-rank CPU time, against W = 1; the top pairs must
  be the same at every W. On a machine with fewer cores than W ranks the wall time cannot fall
  as 1/W; the per-rank CPU time shows the work each rank does.
* ``compressed``: float16 storage + IVF-PQ (``bank_storage="float16"``, ``index="ivfpq"``) at
  ``--compressed-sizes`` against the exact float32 bank, with the vectors in a memory-mapped file
  (``bank_storage_path``) and in RAM: ``memory_bytes()`` per vector (index, metadata, vectors in
  RAM / in the file), recall@k with and without re-ranking, build, query, update (128 replaced
  vectors) and refresh time (also with the file's pages dropped from the page cache), the
  refresh's neighbour recall and its top pairs against exact (and against an exact search over
  the same float16 vectors), with the refresh scanning its probed lists exactly
  (``bank_refresh_search="lists"``), with the refresh-only re-rank (``bank_refresh_rerank``) and
  with the training-time re-rank.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

from benchmarks import _common as C

NAME = "bank"
HELP = "exact flat vs IVF vs HNSW vs torch mm+topk: build/update, queries/s, refresh, IVF recall"


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, NAME)
    p.add_argument("--sizes", default=None, help="bank sizes (default: 10k,100k,1M; --quick 2k,8k)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--queries", type=int, default=None, help="queries per timed search (default: 512; quick 64)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, interleaved (default: 3; quick 2)")
    p.add_argument("--nprobes", default="1,2,4,8,16,32,64,128", help="IVF nprobe values for the trade-off curve")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="IVF recall@k the smallest nprobe reaching it is reported for")
    p.add_argument("--hnsw-max", type=C.parse_size, default=None,
                   help="largest N that also gets an HNSW index (default: 100k; its build is slow)")
    p.add_argument("--refresh-queries", type=int, default=None,
                   help="kNN queries per confusion refresh (default: HardNegConfig's 20000; quick 500)")
    p.add_argument("--search-chunks", default="64,256",
                   help="kNN queries per bank search to compare in the IVF refresh (not in --quick)")
    p.add_argument("--exact-refresh-max", type=C.parse_size, default=None,
                   help="largest N whose exact refresh is measured rather than estimated (default: 100k)")
    p.add_argument("--sections", default="main",
                   help="comma list of main (index comparison), sharded (W processes), compressed (fp16 + IVF-PQ)")
    p.add_argument("--exact-sizes", default=None, help="bank sizes of the exact section (default: 10k,50k,100k; "
                   "quick 4k)")
    p.add_argument("--shard-worlds", default="1,2,4", help="process counts of the sharded section")
    p.add_argument("--shard-size", type=C.parse_size, default=None, help="bank size of the sharded section "
                   "(default: 100k; quick 4k)")
    p.add_argument("--compressed-sizes", default=None, help="bank sizes of the compressed section (default: 1M,2M; "
                   "quick 20k)")
    p.add_argument("--pq-bytes", type=int, default=None, help="IVF-PQ bytes per vector (default: HardNegConfig's)")
    p.add_argument("--rerank", type=int, default=None, help="IVF-PQ re-rank factor (default: HardNegConfig's)")
    p.add_argument("--reranks", default="0,4,16,32", help="IVF-PQ re-rank factors whose recall is measured")
    p.add_argument("--refresh-rerank", type=int, default=None,
                   help="IVF-PQ re-rank factor of the refresh's searches (default: HardNegConfig's bank_refresh_rerank)")
    p.add_argument("--refresh-search", choices=("lists", "rerank"), default=None,
                   help="the refresh's IVF-PQ search (default: HardNegConfig's bank_refresh_search); the "
                        "other one is measured too, on the first variant")
    p.add_argument("--compressed-variants", default=None,
                   help="comma list: file (vectors memory-mapped, storage_path), ram (default: file,ram)")
    p.add_argument("--no-exact16", action="store_true",
                   help="skip the exact refresh over float16 vectors (what storage alone changes)")
    p.add_argument("--compressed-queries", type=int, default=None,
                   help="recall queries in the compressed section (default: 256; quick 64)")
    p.add_argument("--faiss-threads", type=int, default=1,
                   help="FAISS threads in the compressed section (as the engine's refresh_threads; 0 = all)")
    p.add_argument("--compressed-refresh-queries", type=int, default=None,
                   help="kNN queries per refresh in the compressed section (default: 500; quick 200)")
    p.set_defaults(bench=NAME)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from hardneg.config import HardNegConfig

    q = args.quick
    sizes = [C.parse_size(s) for s in (C.parse_list(args.sizes) or (["2k", "8k"] if q else ["10k", "100k", "1M"]))]
    return {
        "sizes": sizes,
        "dim": args.dim,
        "queries": args.queries or (64 if q else 512),
        "k": args.k,
        "repeats": args.repeats or (2 if q else 3),
        "nprobes": C.parse_list(args.nprobes, int),
        "target_recall": args.target_recall,
        "hnsw_max": args.hnsw_max if args.hnsw_max is not None else (8_000 if q else 100_000),
        "refresh_queries": args.refresh_queries or (500 if q else HardNegConfig(num_classes=2).refresh_queries),
        "exact_refresh_max": args.exact_refresh_max if args.exact_refresh_max is not None else 100_000,
        "search_chunks": C.parse_list(args.search_chunks, int), "quick": bool(args.quick),
        "update_batch": 128,
        "num_classes": 10,
        "sections": C.parse_list(args.sections) or ["main"],
        "exact_sizes": [C.parse_size(x) for x in (C.parse_list(args.exact_sizes) or (["4k"] if q else ["10k", "50k", "100k"]))],
        "shard_worlds": C.parse_list(args.shard_worlds, int),
        "shard_size": args.shard_size or (4_000 if q else 100_000),
        "compressed_sizes": [C.parse_size(x) for x in (C.parse_list(args.compressed_sizes)
                                                         or (["20k"] if q else ["1M", "2M"]))],
        "pq_bytes": args.pq_bytes or HardNegConfig(num_classes=2).bank_pq_bytes,
        "rerank": args.rerank if args.rerank is not None else HardNegConfig(num_classes=2).bank_rerank,
        "compressed_refresh_queries": args.compressed_refresh_queries or (200 if q else 500),
        "compressed_queries": args.compressed_queries or (64 if q else 256),
        "reranks": C.parse_list(args.reranks, int),
        "refresh_rerank": (args.refresh_rerank if args.refresh_rerank is not None
                           else HardNegConfig(num_classes=2).bank_refresh_rerank),
        "refresh_search": args.refresh_search or HardNegConfig(num_classes=2).bank_refresh_search,
        "compressed_variants": C.parse_list(args.compressed_variants) or ["file", "ram"],
        "compressed_exact16": not args.no_exact16,
        "faiss_threads": args.faiss_threads,
    }


def _torch_knn(bank: Any, queries: Any, k: int, block: int = 65_536) -> tuple[Any, Any]:
    """Exact top-k inner products with torch: ``q @ X.T`` + ``topk`` per block, then merged."""
    import torch

    best_s = best_i = None
    for start in range(0, bank.shape[0], block):
        s = queries @ bank[start:start + block].T
        ks = min(k, s.shape[1])
        vals, idx = torch.topk(s, ks, dim=1)
        idx = idx + start
        if best_s is None:
            best_s, best_i = vals, idx
        else:
            cat_s, cat_i = torch.cat([best_s, vals], 1), torch.cat([best_i, idx], 1)
            best_s, pos = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
            best_i = torch.gather(cat_i, 1, pos)
    return best_s, best_i


def _flush(bank: Any) -> None:
    """Apply IVF work a bank queued (``EmbeddingBank.flush`` where it exists), so timings include it."""
    flush = getattr(bank, "flush", None)
    if flush is not None:
        flush()


def _recall(found: Any, truth: Any) -> float:
    """Mean share of the exact k neighbours that an approximate search also returned."""
    import numpy as np

    hits = [len(set(f.tolist()) & set(t.tolist())) / max(1, len(t)) for f, t in zip(found, truth)]
    return float(np.mean(hits))


def _one_size(n: int, s: dict[str, Any], seed: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from hardneg.bank import EmbeddingBank
    from hardneg.confusion import ConfusionGraph

    d, k, reps, nq = s["dim"], s["k"], s["repeats"], s["queries"]
    t0 = time.perf_counter()
    vectors, labels = C.clustered_embeddings(n + nq, d, s["num_classes"], seed=seed)
    queries, vectors, labels = vectors[n:], vectors[:n], labels[:n]
    ids = np.arange(n)
    print(f"[N={C.human_size(n)}] data {time.perf_counter() - t0:.1f}s", flush=True)
    out: dict[str, Any] = {"n": n, "build_s": {}, "update_s": {}, "query_s": {}, "qps": {}, "refresh_s": {},
                           "refresh_estimated": {}, "refresh_top_pairs": {}}

    # ---------------------------------------------------------------- build
    def build(kind: str) -> EmbeddingBank:
        threshold = max(2, n // 5)
        bank = EmbeddingBank(d, s["num_classes"], index=kind, ivf_threshold=threshold, use_gpu=False)
        t = time.perf_counter()
        # in chunks, as a growing bank fills (the IVF is trained when it first holds N/5 vectors)
        C.upsert_in_chunks(bank, ids, vectors, labels, cuts=[threshold] if kind == "ivf" else [])
        _flush(bank)
        out["build_s"][kind] = time.perf_counter() - t
        print(f"[N={C.human_size(n)}] build {kind}: {out['build_s'][kind]:.1f}s ({bank.active_index})", flush=True)
        return bank

    banks: dict[str, Any] = {"flat": build("flat"), "ivf": build("ivf")}
    out["ivf_nlist"] = banks["ivf"].nlist
    out["ivf_default_nprobe"] = banks["ivf"].nprobe
    if n <= s["hnsw_max"]:
        banks["hnsw"] = build("hnsw")
    t = time.perf_counter()
    xt = torch.from_numpy(vectors)  # no index: the vectors are the "index" (updates write into them)
    out["build_s"]["torch"] = time.perf_counter() - t
    qt = torch.from_numpy(queries)
    methods = list(banks) + ["torch"]

    # ---------------------------------------------------------------- queries, interleaved
    times: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, Any] = {}
    for rep in range(reps):
        for m in C.rotate(methods, rep):
            t = time.perf_counter()
            if m == "torch":
                _, found = _torch_knn(xt, qt, k)
                found = found.numpy()
            else:
                _, found = banks[m].search(queries, k)
            times[m].append(time.perf_counter() - t)
            results[m] = found
    out["query_s"] = {m: C.summary(v) for m, v in times.items()}
    out["qps"] = {m: nq / C.median(v) for m, v in times.items()}
    truth = results["flat"]
    out["recall"] = {m: _recall(results[m], truth) for m in methods}
    print(f"[N={C.human_size(n)}] queries/s " + ", ".join(f"{m} {out['qps'][m]:.0f}" for m in methods), flush=True)

    # ---------------------------------------------------------------- IVF nprobe trade-off (vs the exact median)
    ivf = banks["ivf"]
    exact_med = C.median(times["flat"])
    curve = []
    if ivf.active_index == "ivf":
        default_nprobe = ivf.nprobe
        for p in s["nprobes"]:
            if p > out["ivf_nlist"]:
                continue
            ivf.nprobe = p
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                _, found = ivf.search(queries, k)
                ts.append(time.perf_counter() - t)
            med = C.median(ts)
            curve.append({"nprobe": p, "recall": _recall(found, truth), "query_s": med, "qps": nq / med,
                          "speedup_vs_exact": C.ratio(exact_med, med)})
        ivf.nprobe = default_nprobe
    out["ivf_curve"] = curve
    ok = [c for c in curve if c["recall"] >= s["target_recall"]]
    out["ivf_operating_point"] = ok[0] if ok else None
    if ok:
        op = ok[0]
        print(f"[N={C.human_size(n)}] IVF nprobe {op['nprobe']}: recall {op['recall']:.3f}, "
              f"{op['speedup_vs_exact']:.1f}x exact", flush=True)

    # ---------------------------------------------------------------- confusion refresh
    def refresh(bank: Any, search_chunk: Optional[int] = None) -> tuple[float, list[list[Any]]]:
        graph = ConfusionGraph(s["num_classes"], knn_k=10, max_queries=s["refresh_queries"], seed=seed)
        if search_chunk is not None:
            graph.search_chunk = search_chunk
        t = time.perf_counter()
        graph.refresh(bank)
        dt = time.perf_counter() - t
        return dt, [[p.a, p.b, round(p.score, 4)] for p in graph.top_pairs(3)]

    if out["ivf_operating_point"] is not None:
        ivf.nprobe = out["ivf_operating_point"]["nprobe"]
    refresh_kinds = [m for m in banks if not (m == "flat" and n > s["exact_refresh_max"])]
    for m in refresh_kinds:
        dt, top = refresh(banks[m])
        out["refresh_s"][m], out["refresh_top_pairs"][m] = dt, top
        out["refresh_estimated"][m] = False
        print(f"[N={C.human_size(n)}] refresh {m}: {dt:.1f}s top pairs {top}", flush=True)
    out["refresh_ivf_nprobe"] = ivf.nprobe if ivf.active_index == "ivf" else None
    # The IVF refresh scans its probed lists by one matrix product a list (refresh_search="lists", the
    # default) against FAISS's own IVF search of the same lists (a vector at a time): interleaved, same bank
    if ivf.active_index == "ivf" and ivf.refresh_scans_lists:
        ways: dict[str, list[float]] = {"lists": [], "faiss": []}
        tops: dict[str, Any] = {}
        for rep in range(2):
            for way in C.rotate(list(ways), rep):
                ivf.refresh_search = "lists" if way == "lists" else "rerank"
                dt, tops[way] = refresh(ivf)
                ways[way].append(dt)
        ivf.refresh_search = "lists"
        out["refresh_ivf_lists_s"], out["refresh_ivf_faiss_search_s"] = C.median(ways["lists"]), C.median(ways["faiss"])
        out["refresh_ivf_faiss_search_top_pairs"] = tops["faiss"]
        out["refresh_ivf_lists_speedup"] = C.ratio(out["refresh_ivf_faiss_search_s"], out["refresh_ivf_lists_s"])
        out["refresh_ivf_lists_pairs_equal"] = [p[:2] for p in tops["lists"]] == [p[:2] for p in tops["faiss"]]
        print(f"[N={C.human_size(n)}] ivf refresh: list scan {out['refresh_ivf_lists_s']:.2f}s, FAISS's IVF search "
              f"{out['refresh_ivf_faiss_search_s']:.2f}s ({out['refresh_ivf_lists_speedup']:.1f}x), same top pairs "
              f"{out['refresh_ivf_lists_pairs_equal']}", flush=True)
    # Queries per bank search in a refresh: smaller chunks hold the read lock for less time (shorter
    # training-step stalls); does the refresh itself get slower? Interleaved, same bank.
    if ivf.active_index == "ivf" and not s["quick"] and s["search_chunks"]:
        chunk_times: dict[int, list[float]] = {c: [] for c in s["search_chunks"]}
        for rep in range(2):
            for c in C.rotate(list(s["search_chunks"]), rep):
                chunk_times[c].append(refresh(ivf, search_chunk=c)[0])
        out["refresh_by_search_chunk_s"] = {str(c): C.median(v) for c, v in chunk_times.items()}
        base = max(s["search_chunks"])
        out["refresh_by_search_chunk_vs_largest"] = {
            str(c): C.ratio(C.median(v), C.median(chunk_times[base])) for c, v in chunk_times.items()}
        print(f"[N={C.human_size(n)}] ivf refresh by search chunk: "
              + ", ".join(f"{c}: {C.median(v):.2f}s" for c, v in chunk_times.items()), flush=True)
    if "flat" not in out["refresh_s"] and "ivf" in out["refresh_s"]:
        q_refresh = min(n, s["refresh_queries"])
        per_q_exact = exact_med / nq
        per_q_ivf = C.median(times["ivf"]) / nq if out["ivf_operating_point"] is None else \
            out["ivf_operating_point"]["query_s"] / nq
        out["refresh_s"]["flat"] = out["refresh_s"]["ivf"] + q_refresh * max(0.0, per_q_exact - per_q_ivf)
        out["refresh_estimated"]["flat"] = True
    # ---------------------------------------------------------------- update (replace 128 stored vectors), last
    # HNSW cannot replace vectors (a replaced vector makes the graph stale until rebuild()): not timed.
    rng = np.random.default_rng(seed + 1)
    upd_methods = [m for m in methods if m != "hnsw"]
    upd: dict[str, list[float]] = {m: [] for m in upd_methods}
    for rep in range(reps + 1):
        pick = rng.choice(n, size=min(s["update_batch"], n), replace=False)
        new = vectors[rng.permutation(pick)]  # other real vectors: the distribution stays the same
        for m in C.rotate(upd_methods, rep):
            t = time.perf_counter()
            if m == "torch":
                xt.index_copy_(0, torch.from_numpy(pick), torch.from_numpy(new))
            else:
                banks[m].upsert(pick, new, labels[pick])
                _flush(banks[m])  # a bank that queues IVF work does it here instead of in upsert
            if rep:  # the first round warms up
                upd[m].append(time.perf_counter() - t)
    out["update_s"] = {m: C.summary(v) for m, v in upd.items()}
    out["refresh_vs_exact"] = {m: C.ratio(out["refresh_s"]["flat"], v) for m, v in out["refresh_s"].items()}
    out["qps_vs_exact"] = {m: C.ratio(v, out["qps"]["flat"]) for m, v in out["qps"].items()}
    out["update_vs_exact"] = {m: C.ratio(v["median"], out["update_s"]["flat"]["median"])
                              for m, v in out["update_s"].items()}
    del banks, xt
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    s = _settings(args)
    info = C.machine_info()
    info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    print(C.header("bank", info), flush=True)
    t_start = time.perf_counter()
    unknown = set(s["sections"]) - {"main", "exact", "sharded", "compressed"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from main, exact, sharded, compressed")
    results: dict[str, Any] = {"benchmark": NAME, "command": C.command_line(NAME), "quick": bool(args.quick),
                               "settings": s, "machine": info}
    if "exact" in s["sections"]:
        results["exact"] = _exact_section(s, args.seed)
    if "sharded" in s["sections"]:
        results["sharded"] = _sharded_section(s, args.seed)
    if "compressed" in s["sections"]:
        results["compressed"] = [_compressed_size(n, s, args.seed) for n in s["compressed_sizes"]]
        results["compressed_table_markdown"] = _compressed_table(results["compressed"])
        print(results["compressed_table_markdown"], flush=True)
    if "main" not in s["sections"]:
        results["seconds"] = time.perf_counter() - t_start
        results["files"] = [os.path.join(args.out, "results.json")]
        C.write_results(args.out, results)
        print(f"wrote {results['files'][0]}", flush=True)
        return results
    per_size = [_one_size(n, s, args.seed) for n in s["sizes"]]
    results.update(sizes=per_size, seconds=time.perf_counter() - t_start)
    biggest = per_size[-1]
    op = biggest["ivf_operating_point"]
    results["target"] = {
        "n": biggest["n"], "goal": f"IVF >= 5x exact queries/s at recall >= {s['target_recall']}",
        "speedup": op["speedup_vs_exact"] if op else None, "recall": op["recall"] if op else None,
        "nprobe": op["nprobe"] if op else None,
        "met": bool(op and op["speedup_vs_exact"] is not None and op["speedup_vs_exact"] >= 5.0),
    }
    results["table_markdown"] = _table(per_size)
    print(results["table_markdown"], flush=True)
    print(f"target at N={C.human_size(biggest['n'])}: {results['target']}", flush=True)
    return C.finish(args.out, results, _plot(per_size, s, args.out))


# ====================================================================== exact: FAISS's BLAS threshold
@contextmanager
def _faiss_as_called_before() -> Iterator[None]:
    """The exact bank searching as it did before :func:`hardneg.bank.exact_knn`: ``faiss.knn`` on
    whatever chunk the caller asks for (the refresh's 64 queries), whatever its size."""
    import hardneg.bank as bank_mod

    saved = bank_mod.blas_query_chunk, bank_mod._SEQUENTIAL_WORK
    bank_mod.blas_query_chunk, bank_mod._SEQUENTIAL_WORK = (lambda dim: 1), float("inf")
    try:
        yield
    finally:
        bank_mod.blas_query_chunk, bank_mod._SEQUENTIAL_WORK = saved


def _exact_section(s: dict[str, Any], seed: int) -> dict[str, Any]:
    """Refresh and training-time search over an exact bank: hardneg's calls against FAISS's as before."""
    import faiss
    import numpy as np
    import torch

    from hardneg.bank import EmbeddingBank, blas_query_chunk
    from hardneg.confusion import ConfusionGraph

    if s["faiss_threads"] > 0:
        faiss.omp_set_num_threads(s["faiss_threads"])
        torch.set_num_threads(s["faiss_threads"])
    ways = {"before": _faiss_as_called_before, "hardneg": nullcontext}
    rows = []
    for n in s["exact_sizes"]:
        vectors, labels = C.clustered_embeddings(n + 16, s["dim"], s["num_classes"], seed=seed)
        bank = EmbeddingBank(s["dim"], s["num_classes"], index="flat", use_gpu=False)
        C.upsert_in_chunks(bank, np.arange(n), vectors[:n], labels[:n])
        queries = vectors[n:].copy()
        del vectors
        refresh_s: dict[str, list[float]] = {w: [] for w in ways}
        search_s: dict[str, list[float]] = {w: [] for w in ways}
        pairs: dict[str, list[list[Any]]] = {}
        matrix: dict[str, Any] = {}
        found: dict[str, Any] = {}
        for rep in range(s["repeats"]):
            for way in C.rotate(list(ways), rep):
                with ways[way]():
                    graph = ConfusionGraph(s["num_classes"], knn_k=10, max_queries=s["refresh_queries"], seed=seed)
                    t = time.perf_counter()
                    graph.refresh(bank)
                    refresh_s[way].append(time.perf_counter() - t)
                    pairs[way] = [[p.a, p.b, round(p.score, 4)] for p in graph.top_pairs(3)]
                    matrix[way] = graph.matrix()
                    t = time.perf_counter()
                    found[way] = bank.search(queries, s["k"])[1]
                    search_s[way].append(time.perf_counter() - t)
        tol = 1.0 / (10 * max(1, s["refresh_queries"] // s["num_classes"]))  # one neighbour of one query
        row = {"n": n, "refresh_s": {w: C.summary(v) for w, v in refresh_s.items()},
               "search16_s": {w: C.summary(v) for w, v in search_s.items()}, "top_pairs": pairs,
               "pairs_verdict": _pairs_verdict(pairs["hardneg"], pairs["before"], tol),
               # float32 rounding (BLAS or not) may swap a query's 10th and 11th neighbours: one such swap
               # moves a score by `tol`; the matrices must differ by no more than that
               "matrix_max_diff": float(np.abs(matrix["hardneg"] - matrix["before"]).max()), "tie_tolerance": tol,
               "search_ids_agree": float(np.mean(found["before"] == found["hardneg"])),
               "blas_query_chunk": blas_query_chunk(s["dim"])}
        row["pairs_agree"] = row["matrix_max_diff"] <= tol * 1.001
        row["refresh_speedup"] = C.ratio(row["refresh_s"]["before"]["median"], row["refresh_s"]["hardneg"]["median"])
        row["search16_speedup"] = C.ratio(row["search16_s"]["before"]["median"], row["search16_s"]["hardneg"]["median"])
        rows.append(row)
        print(f"[exact N={C.human_size(n)}] refresh {row['refresh_s']['before']['median']:.2f}s before, "
              f"{row['refresh_s']['hardneg']['median']:.2f}s now ({row['refresh_speedup']:.1f}x); 16-query search "
              f"{row['search16_s']['before']['median'] * 1e3:.1f} / {row['search16_s']['hardneg']['median'] * 1e3:.1f} ms; "
              f"top pairs {row['pairs_verdict']}, matrix differs by {row['matrix_max_diff']:.2g} (one neighbour: "
              f"{tol:.2g})", flush=True)
        del bank
    table = C.markdown_table(
        ["N", "refresh s, before", "refresh s, now", "x", "16-query search ms, before", "now", "x", "top-3 pairs",
         "scores differ by (one neighbour)", "search ids agree"],
        [[C.human_size(r["n"]), C.fmt(r["refresh_s"]["before"]["median"], ".2f"),
          C.fmt(r["refresh_s"]["hardneg"]["median"], ".2f"), C.fmt(r["refresh_speedup"], ".1f"),
          C.fmt(r["search16_s"]["before"]["median"] * 1e3, ".1f"), C.fmt(r["search16_s"]["hardneg"]["median"] * 1e3, ".1f"),
          C.fmt(r["search16_speedup"], ".1f"), r["pairs_verdict"],
          f"{r['matrix_max_diff']:.2g} ({r['tie_tolerance']:.2g})" + ("" if r["pairs_agree"] else " MORE"),
          C.fmt(r["search_ids_agree"], ".3f")]
         for r in rows])
    print(table, flush=True)
    return {"refresh_queries": s["refresh_queries"], "faiss_threads": s["faiss_threads"],
            "faiss_blas_threshold": int(getattr(faiss.cvar, "distance_compute_blas_threshold", 0)),
            "sizes": rows, "table_markdown": table}


# ====================================================================== sharded: W processes
def _sharded_section(s: dict[str, Any], seed: int) -> dict[str, Any]:
    """Per-rank memory and refresh time of a sharded bank at each W, each W its own gloo process group."""
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    runs = []
    for world in s["shard_worlds"]:
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            t = time.perf_counter()
            mp.start_processes(_shard_rank, args=(world, port, tmp, s, seed), nprocs=world, join=True,
                               start_method="spawn")
            ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
        run = {"world": world, "ranks": ranks, "seconds": time.perf_counter() - t,
               "bank_bytes_per_rank": max(r["memory"]["total"] for r in ranks),
               "vector_bytes_per_rank": max(r["memory"]["vectors"] + r["memory"]["index"] for r in ranks),
               "refresh_wall_s": max(r["refresh_wall_s"] for r in ranks),
               "refresh_cpu_s_per_rank": max(r["refresh_cpu_s"] for r in ranks),
               "top_pairs": ranks[0]["top_pairs"],
               "same_on_every_rank": all(r["top_pairs"] == ranks[0]["top_pairs"] for r in ranks)}
        runs.append(run)
        print(f"[sharded W={world}] bank per rank {run['bank_bytes_per_rank'] / 2**20:.1f} MiB, refresh wall "
              f"{run['refresh_wall_s']:.2f}s, cpu per rank {run['refresh_cpu_s_per_rank']:.2f}s, "
              f"top pairs {run['top_pairs']}", flush=True)
    base = runs[0]
    for run in runs:
        run["memory_vs_w1"] = C.ratio(run["bank_bytes_per_rank"], base["bank_bytes_per_rank"])
        run["vector_memory_vs_w1"] = C.ratio(run["vector_bytes_per_rank"], base["vector_bytes_per_rank"])
        run["refresh_wall_vs_w1"] = C.ratio(run["refresh_wall_s"], base["refresh_wall_s"])
        run["refresh_cpu_vs_w1"] = C.ratio(run["refresh_cpu_s_per_rank"], base["refresh_cpu_s_per_rank"])
        run["pairs_equal_w1"] = [p[:2] for p in run["top_pairs"]] == [p[:2] for p in base["top_pairs"]]
    table = C.markdown_table(
        ["W", "bank MiB/rank", "x W=1", "vectors MiB/rank", "x W=1", "refresh wall s", "x W=1", "refresh CPU s/rank",
         "x W=1", "pairs = W=1"],
        [[r["world"], C.fmt(r["bank_bytes_per_rank"] / 2**20, ".1f"), C.fmt(r["memory_vs_w1"], ".2f"),
          C.fmt(r["vector_bytes_per_rank"] / 2**20, ".1f"), C.fmt(r["vector_memory_vs_w1"], ".2f"),
          C.fmt(r["refresh_wall_s"], ".2f"), C.fmt(r["refresh_wall_vs_w1"], ".2f"),
          C.fmt(r["refresh_cpu_s_per_rank"], ".2f"), C.fmt(r["refresh_cpu_vs_w1"], ".2f"),
          "yes" if r["pairs_equal_w1"] and r["same_on_every_rank"] else "NO"] for r in runs])
    print(table, flush=True)
    return {"n": s["shard_size"], "refresh_queries": s["refresh_queries"], "runs": runs, "table_markdown": table}


def _shard_rank(rank: int, world: int, port: int, out_dir: str, s: dict[str, Any], seed: int) -> None:
    """One rank: the same global rows upserted, memory read, two collective refreshes timed."""
    import json

    import faiss
    import numpy as np
    import torch
    import torch.distributed as dist

    from hardneg.confusion import ConfusionGraph
    from hardneg.sharded_bank import ShardedEmbeddingBank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)  # one core's worth per rank: the per-rank CPU time is the rank's work
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n, d = s["shard_size"], s["dim"]
    vectors, labels = C.clustered_embeddings(n, d, s["num_classes"], seed=seed)
    bank = ShardedEmbeddingBank(d, s["num_classes"], index="flat", use_gpu=False)
    C.upsert_in_chunks(bank, np.arange(n), vectors, labels)
    del vectors
    walls, cpus, top = [], [], []
    for _ in range(2):
        graph = ConfusionGraph(s["num_classes"], knn_k=10, max_queries=s["refresh_queries"], seed=seed)
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        graph.refresh(bank)
        cpus.append(time.process_time() - c)
        dist.barrier()
        walls.append(time.perf_counter() - t)
        top = [[p.a, p.b, round(p.score, 6)] for p in graph.top_pairs(3)]
    out = {"rank": rank, "memory": bank.memory_bytes(), "shard_rows": len(bank.shard),
           "refresh_wall_s": min(walls), "refresh_cpu_s": min(cpus), "top_pairs": top}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


# ====================================================================== compressed: fp16 + IVF-PQ
def _compressed_size(n: int, s: dict[str, Any], seed: int) -> dict[str, Any]:
    """float16 + IVF-PQ against the exact float32 bank at one size: the vectors in RAM and in a
    memory-mapped file (``storage_path``), each its own bank and index."""
    import shutil
    import tempfile

    import numpy as np

    from hardneg.bank import EmbeddingBank
    from hardneg.confusion import ConfusionGraph
    from hardneg.sources import boundary_sources

    import faiss

    d, k, nq, K = s["dim"], s["k"], s["compressed_queries"], s["num_classes"]
    if s["faiss_threads"] > 0:
        faiss.omp_set_num_threads(s["faiss_threads"])
    t = time.perf_counter()
    vectors, labels = C.clustered_embeddings(n + nq, d, K, seed=seed)
    queries, vectors, labels = vectors[n:].copy(), vectors[:n], labels[:n]
    ids = np.arange(n)
    tag = f"[compressed N={C.human_size(n)}]"
    print(f"{tag} data {time.perf_counter() - t:.1f}s", flush=True)
    out: dict[str, Any] = {"n": n, "dim": d, "pq_bytes": s["pq_bytes"], "rerank": s["rerank"],
                           "refresh_rerank": s["refresh_rerank"], "refresh_search": s["refresh_search"],
                           "variants": s["compressed_variants"],
                           "build_s": {}, "query_s": {}, "update_ms": {}, "refresh_s": {}, "sources_s": {}, "refresh_recall": {},
                           "top_pairs": {}, "bytes_per_vector": {}}
    threshold = max(2, n // 5)
    tmp = tempfile.mkdtemp(prefix="hardneg-bank-bench-")
    banks: dict[str, EmbeddingBank] = {}
    try:
        for variant in s["compressed_variants"]:  # "file" first: the configuration recommended for 10M+
            path = os.path.join(tmp, "vectors.f16") if variant == "file" else None
            bank = EmbeddingBank(d, K, index="ivfpq", ivf_threshold=threshold, use_gpu=False, storage="float16",
                                 pq_bytes=s["pq_bytes"], rerank=s["rerank"], refresh_rerank=s["refresh_rerank"],
                                 refresh_search=s["refresh_search"], storage_path=path)
            rss_before = C.resident_anon_bytes()
            bank.reserve(n)  # bank_reserve: the dataset's length known up front, no doubling slack
            t = time.perf_counter()
            C.upsert_in_chunks(bank, ids, vectors, labels, cuts=[threshold])
            bank.flush()
            out["build_s"][variant] = time.perf_counter() - t
            rss_after = C.resident_anon_bytes()
            if rss_before is not None and rss_after is not None:  # (the vectors in RAM are anonymous too)
                out.setdefault("resident_bytes_per_vector", {})[variant] = (rss_after - rss_before) / n
            banks[variant] = bank
            print(f"{tag} build IVF-PQ ({variant}) {out['build_s'][variant]:.1f}s ({bank.nlist} lists)", flush=True)
        exact = EmbeddingBank(d, K, index="flat", use_gpu=False)
        exact.reserve(n)  # one allocation: no doubling copy of a multi-GB slot array
        t = time.perf_counter()
        C.upsert_in_chunks(exact, ids, vectors, labels)
        out["build_s"]["flat"] = time.perf_counter() - t
        exact16 = None
        if s["compressed_exact16"]:  # exact search over the same float16 vectors: what storage alone changes
            exact16 = EmbeddingBank(d, K, index="flat", use_gpu=False, storage="float16")
            exact16.reserve(n)
            C.upsert_in_chunks(exact16, ids, vectors, labels)
        del vectors
        comp = next(iter(banks.values()))
        out["nlist"], out["nprobe"] = comp.nlist, comp.nprobe
        # ---- memory: what memory_bytes() measures, per vector
        mem_exact = exact.memory_bytes()
        out["memory_bytes"] = {"flat": mem_exact, **{f"ivfpq_{v}": b.memory_bytes() for v, b in banks.items()}}
        out["bytes_per_vector"]["flat_float32"] = {key: v / n for key, v in mem_exact.items()}
        for variant, bank in banks.items():
            m = out["memory_bytes"][f"ivfpq_{variant}"]
            out["bytes_per_vector"][f"ivfpq_{variant}"] = {key: v / n for key, v in m.items()}
        out["bytes_per_vector"]["ivfpq_index_per_vector"] = comp.pq_bytes + 8 + 8  # code + list id + direct map
        # ---- recall@k and query time (the same index and vectors in every variant: the first one)
        t = time.perf_counter()
        _, truth = exact.search(queries, k)
        out["query_s"]["flat"] = time.perf_counter() - t
        recall = {}
        for rr in sorted({0, s["rerank"], s["refresh_rerank"], *s["reranks"]}):
            comp.rerank = rr
            t = time.perf_counter()
            _, found = comp.search(queries, k)
            out["query_s"][f"ivfpq_rerank{rr}"] = time.perf_counter() - t
            recall[f"rerank{rr}"] = _recall(found, truth)
        comp.rerank = s["rerank"]
        out["recall"] = recall
        print(f"{tag} recall@{k} {recall}, query s {out['query_s']}", flush=True)
        # ---- update: replace 128 stored vectors (upsert + the IVF work it queues)
        rng = np.random.default_rng(seed + 1)
        for name, bank in (("flat", exact), *banks.items()):
            ts = []
            for rep in range(s["repeats"] + 1):
                pick = rng.choice(n, size=s["update_batch"], replace=False)
                _, vec = bank.lookup(pick)[:2]
                t = time.perf_counter()
                bank.upsert(pick, vec[::-1].copy(), labels[pick][::-1].copy())
                bank.flush()
                if rep:
                    ts.append(time.perf_counter() - t)
                bank.upsert(pick, vec, labels[pick])  # put them back: the data stays the benchmark's
                bank.flush()
            out["update_ms"][name] = 1e3 * C.median(ts)
        # ---- the confusion refresh: time, top pairs and the neighbours' recall against exact
        found: dict[str, Any] = {}

        def refresh(name: str, bank: EmbeddingBank) -> None:
            search_many = bank.search_many

            def capture(q: Any, kk: int, chunk: int = 64) -> Any:
                found[name] = r = search_many(q, kk, chunk)
                return r

            def timed_sources(*a: Any) -> Any:  # the refresh's O(N d) pass: one scan of every stored vector
                t0 = time.perf_counter()
                r = boundary_sources(*a)
                out["sources_s"][name] = time.perf_counter() - t0
                return r

            bank.search_many = capture  # type: ignore[method-assign]
            graph = ConfusionGraph(K, knn_k=10, max_queries=s["compressed_refresh_queries"], seed=seed,
                                   source_finder=timed_sources)
            t = time.perf_counter()
            graph.refresh(bank)
            out["refresh_s"][name] = time.perf_counter() - t
            del bank.search_many
            out["top_pairs"][name] = [[p.a, p.b, round(p.score, 5)] for p in graph.top_pairs(5)]
            if name != "flat":
                out["refresh_recall"][name] = _recall(found[name][1], found["flat"][1])
                out.setdefault("refresh_label_diffs", {})[name] = _label_diffs(found[name], found["flat"])
            print(f"{tag} refresh {name}: {out['refresh_s'][name]:.2f}s (sources {out['sources_s'][name]:.2f}s), top {out['top_pairs'][name]}, "
                  f"neighbour recall {out['refresh_recall'].get(name)}", flush=True)

        refresh("flat", exact)
        if exact16 is not None:
            refresh("exact_float16", exact16)
            del exact16
        for variant, bank in banks.items():
            refresh(f"ivfpq_{variant}", bank)
        base = next(iter(banks))
        other = "rerank" if s["refresh_search"] == "lists" else "lists"
        comp.refresh_search = other  # the other refresh search, on the same bank
        refresh(f"ivfpq_{base}_refresh_{other}" + (f"{s['refresh_rerank']}" if other == "rerank" else ""), comp)
        comp.refresh_search, comp.refresh_rerank = "rerank", None  # searching like training-time searches
        refresh(f"ivfpq_{base}_rerank{s['rerank']}", comp)
        comp.refresh_search, comp.refresh_rerank = s["refresh_search"], s["refresh_rerank"]
        if "file" in banks:  # this file's pages dropped from the page cache: the re-rank reads the disk
            _drop_page_cache(banks["file"])
            refresh("ivfpq_file_cold", banks["file"])
        tol = 1.0 / (10 * max(1, s["compressed_refresh_queries"] // K))  # one neighbour of one query
        out["tie_tolerance"] = tol
        out["pairs_vs_exact"] = {name: _pairs_verdict(pairs, out["top_pairs"]["flat"], tol)
                                 for name, pairs in out["top_pairs"].items() if name != "flat"}
        first = f"ivfpq_{next(iter(banks))}"
        out["pairs_equal_exact"] = out["pairs_vs_exact"][first] == "equal"
        out["pairs_same_set"] = out["pairs_vs_exact"][first] in ("equal", "equal up to ties", "same set")
        print(f"{tag} refresh s {out['refresh_s']}, pairs vs exact {out['pairs_vs_exact']}, "
              f"update ms {out['update_ms']}", flush=True)
        del exact, comp
    finally:
        banks.clear()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _drop_page_cache(bank: Any) -> None:
    """Evict a file-backed bank's vectors from the page cache (this file only; other processes'
    cache is left alone). The kernel keeps pages that are mapped, so the bank's mapping is closed
    first and opened again after (the bank's private slot array: a benchmark-only reach-in)."""
    import gc

    import numpy as np

    mm = bank._vectors
    rows, dtype, path = mm.shape[0], mm.dtype, bank.storage_path
    mm.flush()
    bank._vectors = np.zeros((0, bank.dim), dtype=dtype)
    del mm
    gc.collect()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    bank._vectors = np.memmap(path, dtype=dtype, mode="r+", shape=(rows, bank.dim))


def _label_diffs(got: Any, want: Any, limit: int = 8) -> list[dict[str, Any]]:
    """Refresh queries whose 11 neighbours' labels differ from exact's: the neighbours each search
    has that the other lacks, as (id, label, score)."""
    import numpy as np

    out = []
    for row in range(len(want[1])):
        if sorted(got[2][row].tolist()) == sorted(want[2][row].tolist()):
            continue
        g, w = set(got[1][row].tolist()), set(want[1][row].tolist())
        side = lambda r, ids: [(int(i), int(lab), round(float(sc), 5))  # noqa: E731
                               for sc, i, lab in zip(r[0][row], r[1][row], r[2][row]) if int(i) in ids]
        out.append({"row": row, "only_found": side(got, g - w), "only_exact": side(want, w - g),
                    "kth_exact_score": round(float(np.nanmin(want[0][row])), 5)})
        if len(out) == limit:
            break
    return out


def _pairs_verdict(pairs: list[list[Any]], exact: list[list[Any]], tol: float, top: int = 3) -> str:
    """``equal`` (the top pairs in exact's order), ``equal up to ties`` (the same pairs; only pairs
    whose exact scores are within ``tol`` swapped), ``same set`` or ``differ``."""
    mine, want = [tuple(p[:2]) for p in pairs[:top]], [tuple(p[:2]) for p in exact[:top]]
    if mine == want:
        return "equal"
    if set(mine) != set(want):
        return "differ"
    score = {tuple(p[:2]): p[2] for p in exact}
    swapped = [(a, b) for i, a in enumerate(mine) for b in mine[i + 1:] if want.index(a) > want.index(b)]
    return "equal up to ties" if all(abs(score[a] - score[b]) <= tol for a, b in swapped) else "same set"


def _compressed_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        b = r["bytes_per_vector"]
        for variant in r["variants"]:
            m = b[f"ivfpq_{variant}"]
            name = f"ivfpq_{variant}"
            out.append([C.human_size(r["n"]), variant, C.fmt(m["index"], ".1f"), C.fmt(m["metadata"], ".1f"),
                        C.fmt(m["vectors"], ".0f"), C.fmt(m.get("vectors_on_disk", 0), ".0f"), C.fmt(m["total"], ".1f"),
                        C.fmt(r.get("resident_bytes_per_vector", {}).get(variant), ".1f"),
                        C.fmt(r["recall"].get("rerank0"), ".3f"), C.fmt(r["recall"].get(f"rerank{r['rerank']}"), ".3f"),
                        C.fmt(r["build_s"][variant], ".1f"), C.fmt(r["update_ms"][variant], ".1f"),
                        C.fmt(r["refresh_s"][name], ".1f"), C.fmt(r["sources_s"].get(name), ".1f"),
                        C.fmt(r["refresh_recall"].get(name), ".4f"),
                        r["pairs_vs_exact"][name]])
        for name in r["refresh_s"]:  # the same bank refreshed another way: the refresh's columns only
            if name.startswith("ivfpq_") and name[6:] not in r["variants"]:
                out.append([C.human_size(r["n"]), f"{name[6:]} (refresh only)"] + ["-"] * 10
                           + [C.fmt(r["refresh_s"][name], ".1f"), C.fmt(r["sources_s"].get(name), ".1f"),
                              C.fmt(r["refresh_recall"].get(name), ".4f"), r["pairs_vs_exact"][name]])
        out.append([C.human_size(r["n"]), "exact float32", "-", C.fmt(b["flat_float32"]["metadata"], ".1f"),
                    C.fmt(b["flat_float32"]["vectors"], ".0f"), "0", C.fmt(b["flat_float32"]["total"], ".1f"), "-", "1",
                    "1", C.fmt(r["build_s"]["flat"], ".1f"), C.fmt(r["update_ms"]["flat"], ".1f"),
                    C.fmt(r["refresh_s"]["flat"], ".1f"), C.fmt(r["sources_s"].get("flat"), ".1f"), "1", "-"])
    return C.markdown_table(
        ["N", "bank", "index B/vec", "metadata B/vec", "vectors RAM B/vec", "vectors file B/vec", "RAM B/vec (counted)",
         "resident B/vec (RssAnon growth)",
         "recall@k PQ", "recall@k re-ranked", "build s", "update 128 ms", "refresh s", "of it sources s",
         "refresh recall@11",
         "top-3 pairs vs exact"], out)


def _table(per_size: list[dict[str, Any]]) -> str:
    rows = []
    for r in per_size:
        for m in ("flat", "ivf", "hnsw", "torch"):
            if m not in r["qps"]:
                continue
            ref = r["refresh_s"].get(m)
            ref_txt = C.fmt(ref, ".1f") + (" (est.)" if r["refresh_estimated"].get(m) else "") if ref is not None else "-"
            rows.append([
                C.human_size(r["n"]), m, C.fmt(r["build_s"].get(m), ".2f"),
                C.fmt(1e3 * r["update_s"][m]["median"], ".2f") if m in r["update_s"] else "n/a", C.fmt(r["qps"][m], ".0f"),
                C.fmt(r["qps_vs_exact"][m], ".2f"), C.fmt(r["recall"][m], ".3f"), ref_txt,
                C.fmt(r["refresh_vs_exact"].get(m), ".2f"),
            ])
        op = r["ivf_operating_point"]
        if op:
            rows.append([C.human_size(r["n"]), f"ivf nprobe={op['nprobe']}", "", "", C.fmt(op["qps"], ".0f"),
                         C.fmt(op["speedup_vs_exact"], ".2f"), C.fmt(op["recall"], ".3f"), "", ""])
    return C.markdown_table(
        ["N", "index", "build s", "update 128 ms", "queries/s", "x exact", "recall@k", "refresh s", "refresh x exact"],
        rows)


def _plot(per_size: list[dict[str, Any]], s: dict[str, Any], out_dir: str) -> str:
    plt = C.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, style in (("flat", "o-"), ("ivf", "s-"), ("hnsw", "^-"), ("torch", "x--")):
        pts = [(r["n"], r["qps"][m]) for r in per_size if m in r["qps"]]
        if pts:
            a1.plot(*zip(*pts), style, label=m if m != "ivf" else f"ivf (nprobe {per_size[0]['ivf_default_nprobe']})")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("bank size N")
    a1.set_ylabel(f"queries/s (k={s['k']}, batch {s['queries']})")
    a1.set_title("query throughput")
    a1.legend(fontsize=8)
    for r in per_size:
        c = r["ivf_curve"]
        if c:
            a2.plot([p["recall"] for p in c], [p["speedup_vs_exact"] for p in c], "o-", label=f"N={C.human_size(r['n'])}")
            for p in c:
                a2.annotate(str(p["nprobe"]), (p["recall"], p["speedup_vs_exact"]), fontsize=6)
    a2.axvline(s["target_recall"], color="grey", ls=":", lw=1)
    a2.axhline(5.0, color="grey", ls=":", lw=1)
    a2.set_yscale("log")
    a2.set_xlabel("IVF recall@k vs exact")
    a2.set_ylabel("speed-up over exact flat")
    a2.set_title("IVF trade-off (labels: nprobe)")
    a2.legend(fontsize=8)
    return C.save_figure(fig, os.path.join(out_dir, "bank.png"))


main = C.build_main(__name__)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
