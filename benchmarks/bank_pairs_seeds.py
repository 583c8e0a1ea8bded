"""The confusion refresh's top pairs on a compressed bank against an exact one, over several query draws.

    PYTHONPATH=$PWD python -m benchmarks.bank_pairs_seeds 1M out.json 5 [QUERIES] [--pq-bytes B] [--rerank R] [--refresh-rerank R] [--refresh-search lists|rerank] [--refresh-nprobe P]

Builds ``bank_bench``'s recommended compressed bank (``index="ivfpq"``, ``storage="float16"``,
file-backed, the default refresh settings, or the given code size and re-rank depths) and an exact float16 bank over the same clustered
embeddings (d = 512, 10 classes), then refreshes a :class:`ConfusionGraph` (``QUERIES`` queries,
500 by default) on both for each query seed ``0 .. SEEDS-1`` and writes, per seed, both top-5
lists with their scores and whether they are the same set and the same order. Exact's own lists
from one seed to the next show how much the query draw alone moves the pairs (benchmarks/README.md,
compressed storage).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np


def main(argv: list[str]) -> list[dict[str, Any]]:
    from benchmarks import _common as C
    from hardneg.bank import EmbeddingBank
    from hardneg.confusion import ConfusionGraph

    import argparse

    from hardneg.bank import BankOptions

    p = argparse.ArgumentParser(prog="python -m benchmarks.bank_pairs_seeds")
    p.add_argument("n", type=C.parse_size)
    p.add_argument("out")
    p.add_argument("seeds", type=int)
    p.add_argument("queries", type=int, nargs="?", default=500)
    defaults = BankOptions()
    p.add_argument("--pq-bytes", type=int, default=defaults.bank_pq_bytes)
    p.add_argument("--rerank", type=int, default=defaults.bank_rerank)
    p.add_argument("--refresh-rerank", type=int, default=defaults.bank_refresh_rerank)
    p.add_argument("--refresh-nprobe", default=None,
                   help="lists each refresh query probes (default: the bank's, EmbeddingBank.refresh_probes); a comma list "
                        "refreshes the same bank with each, the first under 'ivfpq', the rest under 'ivfpq_nprobe<P>'")
    p.add_argument("--refresh-search", choices=("rerank", "lists"), default=defaults.bank_refresh_search,
                   help="the refresh's IVF-PQ search: re-rank PQ candidates, or score the probed lists exactly")
    args = p.parse_args(argv)
    nprobes = C.parse_list(args.refresh_nprobe, int) if args.refresh_nprobe else [None]
    n, out_path, seeds, queries = args.n, args.out, args.seeds, args.queries
    d, K = 512, 10
    vectors, labels = C.clustered_embeddings(n, d, K, seed=0)
    ids, threshold = np.arange(n), max(2, n // 5)
    tmp = tempfile.mkdtemp(prefix="hardneg-pairs-seeds-")
    rows: list[dict[str, Any]] = []
    try:
        comp = EmbeddingBank(d, K, index="ivfpq", ivf_threshold=threshold, use_gpu=False, storage="float16",
                             storage_path=os.path.join(tmp, "vectors.f16"), pq_bytes=args.pq_bytes,
                             rerank=args.rerank, refresh_rerank=args.refresh_rerank,
                             refresh_search=args.refresh_search, refresh_nprobe=nprobes[0])
        comp.reserve(n)
        C.upsert_in_chunks(comp, ids, vectors, labels, cuts=[threshold])
        comp.flush()
        exact = EmbeddingBank(d, K, index="flat", use_gpu=False, storage="float16")
        exact.reserve(n)
        C.upsert_in_chunks(exact, ids, vectors, labels)
        del vectors
        for seed in range(seeds):
            row: dict[str, Any] = {"seed": seed, "queries": queries, "pq_bytes": args.pq_bytes,
                                   "refresh_rerank": args.refresh_rerank, "refresh_search": args.refresh_search,
                                   "refresh_nprobe": None}
            runs = [("exact", exact, None)] + [("ivfpq" if i == 0 else f"ivfpq_nprobe{p}", comp, p)
                                               for i, p in enumerate(nprobes)]
            for name, bank, nprobe in runs:
                if bank is comp:
                    comp.refresh_nprobe = nprobe
                    if name == "ivfpq":
                        row["refresh_nprobe"] = comp.refresh_probes
                graph = ConfusionGraph(K, knn_k=10, max_queries=queries, seed=seed)
                t = time.perf_counter()
                graph.refresh(bank)
                row[f"{name}_s"] = time.perf_counter() - t
                row[name] = [[p.a, p.b, round(p.score, 5)] for p in graph.top_pairs(5)]
            want = [tuple(p[:2]) for p in row["exact"]]
            for name, _, _ in runs[1:]:
                got = [tuple(p[:2]) for p in row[name]]
                verdict = {"same_set": sorted(want) == sorted(got), "same_order": want == got,
                           "same_top3_set": sorted(want[:3]) == sorted(got[:3])}
                if name == "ivfpq":
                    row.update(verdict)
                else:
                    row[f"{name}_verdict"] = verdict
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(out_path, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
