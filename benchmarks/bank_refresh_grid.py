"""The refresh-only search settings of an IVF-PQ bank, tried on one pair of banks built once.

    PYTHONPATH=$PWD python -m benchmarks.bank_refresh_grid 1M out.json 16x32,16x64,16x128,64x128

Builds the exact float32 flat bank, an exact float16 flat bank and the ``index="ivfpq"``,
``storage="float16"`` bank of ``bank_bench``'s compressed section over the same clustered
embeddings (d = 512, 10 classes, 1 FAISS thread), refreshes a :class:`ConfusionGraph` (500 queries)
on the exact banks once, then on the IVF-PQ bank once per ``NPROBExRERANK`` (its
``refresh_nprobe`` / ``refresh_rerank``), and writes each refresh's top-8 pairs with their scores,
its time and the recall@11 of its neighbours against exact to ``out.json``. The grid behind
``bank_refresh_rerank``'s default (benchmarks/README.md, compressed storage); not a ``hardneg
bench`` section, as it is a one-off search over settings. The IVF-PQ bank keeps its vectors in a
memory-mapped file (``storage_path``, a temporary directory); ``cold``: one more refresh with the
last setting after the file's pages are dropped from the page cache.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np


def main(argv: list[str]) -> dict[str, Any]:
    import faiss

    from benchmarks import _common as C
    from hardneg.bank import EmbeddingBank
    from hardneg.confusion import ConfusionGraph

    import os
    import tempfile

    from benchmarks.bank_bench import _drop_page_cache

    if len(argv) not in (3, 4) or (len(argv) == 4 and argv[3] != "cold"):
        raise SystemExit("usage: python -m benchmarks.bank_refresh_grid N OUT.json NPROBExRERANK[,...] [cold]")
    n, out_path = C.parse_size(argv[0]), argv[1]
    grid = [tuple(int(x) for x in g.split("x")) for g in argv[2].split(",")]
    faiss.omp_set_num_threads(1)
    d, K, seed = 512, 10, 0
    res: dict[str, Any] = {"n": n, "runs": []}

    def log(*a: Any) -> None:
        print(time.strftime("%H:%M:%S"), *a, flush=True)

    vectors, labels = C.clustered_embeddings(n, d, K, seed=seed)
    ids = np.arange(n)
    threshold = max(2, n // 5)
    tmp = tempfile.mkdtemp(prefix="hardneg-refresh-grid-")
    comp = EmbeddingBank(d, K, index="ivfpq", ivf_threshold=threshold, use_gpu=False, storage="float16",
                         storage_path=os.path.join(tmp, "vectors.f16"))
    comp.reserve(n)
    t = time.perf_counter()
    C.upsert_in_chunks(comp, ids, vectors, labels, cuts=[threshold])
    comp.flush()
    res["build_ivfpq_s"] = time.perf_counter() - t
    log("ivfpq build", res["build_ivfpq_s"], comp.nlist)
    exact = EmbeddingBank(d, K, index="flat", use_gpu=False)
    exact16 = EmbeddingBank(d, K, index="flat", use_gpu=False, storage="float16")
    for bank in (exact, exact16):
        bank.reserve(n)
        C.upsert_in_chunks(bank, ids, vectors, labels)
    del vectors
    found: dict[str, Any] = {}

    def refresh(name: str, bank: EmbeddingBank) -> tuple[float, list[list[Any]]]:
        search_many = bank.search_many

        def capture(q: Any, k: int, chunk: int = 64) -> Any:
            found[name] = r = search_many(q, k, chunk)
            return r

        bank.search_many = capture  # type: ignore[method-assign]
        graph = ConfusionGraph(K, knn_k=10, max_queries=500, seed=seed)
        t0 = time.perf_counter()
        graph.refresh(bank)
        dt = time.perf_counter() - t0
        del bank.search_many
        return dt, [[p.a, p.b, round(p.score, 5)] for p in graph.top_pairs(8)]

    res["refresh_exact_s"], res["exact_top"] = refresh("exact", exact)
    log("exact", res["refresh_exact_s"], res["exact_top"])
    res["refresh_exact16_s"], res["exact16_top"] = refresh("exact16", exact16)
    log("exact float16", res["refresh_exact16_s"], res["exact16_top"])
    del exact16
    truth = found["exact"][1]
    for nprobe, rerank in grid:
        comp.refresh_nprobe, comp.refresh_rerank = nprobe, rerank
        dt, top = refresh("ivfpq", comp)
        got = found["ivfpq"][1]
        recall = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got.tolist(), truth.tolist())]))
        run = {"nprobe": nprobe, "rerank": rerank, "refresh_s": dt, "recall11": recall, "top": top}
        res["runs"].append(run)
        log(run)
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    if len(argv) == 4:
        _drop_page_cache(comp)
        dt, top = refresh("ivfpq", comp)
        res["cold"] = {"nprobe": comp.refresh_nprobe, "rerank": comp.refresh_rerank, "refresh_s": dt, "top": top}
        log("cold", res["cold"])
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    os.remove(comp.storage_path)
    os.rmdir(tmp)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
