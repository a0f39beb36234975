"""Ingest benchmark: the array-backed MegaContext tree vs a naive object-per-node tree, same run.

Usage: ``python -m benchmarks.bench_tree [--tokens 1000000] [--chunk 32] [--d-model 64]``.
Reports seconds and peak traced memory for ingesting ``--tokens`` tokens in chunks of ``--chunk``
(the refocus step K) and the speed / memory ratios against the naive baseline.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from benchmarks.common import write_results
from megacontext.tree import MegaContextTree, TreeConfig


class NaiveTree:
    """Baseline: one Python object (dict) per node, gists computed one node at a time."""

    def __init__(self, b: int, max_level: int) -> None:
        self.b, self.levels = b, [[] for _ in range(max_level + 1)]

    def ingest(self, ids: np.ndarray, emb: np.ndarray) -> None:
        for tok, e in zip(ids.tolist(), emb, strict=True):
            self.levels[0].append({"id": tok, "emb": e.copy()})
            for lv in range(1, len(self.levels)):
                below = self.levels[lv - 1]
                if len(below) % self.b or len(below) // self.b == len(self.levels[lv]):
                    break
                kids = below[-self.b :]
                self.levels[lv].append({"emb": np.mean([k["emb"] for k in kids], axis=0)})


def _ingest_all(make, ids: np.ndarray, emb: np.ndarray, chunk: int):
    tree = make()
    for s in range(0, ids.shape[0], chunk):
        tree.ingest(ids[s : s + chunk], emb[s : s + chunk])
    return tree


def _measure(make, ids: np.ndarray, emb: np.ndarray, chunk: int) -> tuple[float, int, object]:
    """Seconds (untraced: tracemalloc slows allocation) and peak traced bytes (a second pass)."""
    t0 = time.perf_counter()
    tree = _ingest_all(make, ids, emb, chunk)
    seconds = time.perf_counter() - t0
    del tree
    tracemalloc.start()
    tree = _ingest_all(make, ids, emb, chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, tree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    ids = rng.integers(0, 49152, a.tokens)
    emb = rng.normal(size=(a.tokens, a.d_model)).astype(np.float32)
    cfg = TreeConfig(block_size=32, max_level=2, d_model=a.d_model)
    fast_s, fast_peak, tree = _measure(lambda: MegaContextTree(cfg), ids, emb, a.chunk)
    res_s, res_peak, _ = _measure(
        lambda: MegaContextTree(cfg, reserve_tokens=a.tokens), ids, emb, a.chunk
    )
    naive_s, naive_peak, naive = _measure(lambda: NaiveTree(32, 2), ids, emb, a.chunk)
    for lv in range(3):  # same gists, or the comparison means nothing
        ref = np.stack([n["emb"] for n in naive.levels[lv]])
        np.testing.assert_allclose(tree.embeddings(lv), ref, rtol=1e-5, atol=1e-5)
    results = {
        "array_tree": {
            "seconds": fast_s,
            "tokens_per_s": a.tokens / fast_s,
            "peak_bytes": fast_peak,
            "bytes_per_token": fast_peak / a.tokens,
        },
        "array_tree_reserved": {
            "seconds": res_s,
            "tokens_per_s": a.tokens / res_s,
            "peak_bytes": res_peak,
            "bytes_per_token": res_peak / a.tokens,
        },
        "naive_tree": {
            "seconds": naive_s,
            "tokens_per_s": a.tokens / naive_s,
            "peak_bytes": naive_peak,
            "bytes_per_token": naive_peak / a.tokens,
        },
        "speedup_vs_naive": naive_s / fast_s,
        "speedup_reserved_vs_naive": naive_s / res_s,
        "memory_ratio_naive_over_array": naive_peak / fast_peak,
        "memory_ratio_naive_over_reserved": naive_peak / res_peak,
        "raw_embedding_bytes": emb.nbytes,
    }
    print(json.dumps(results, indent=1))
    write_results("tree_ingest", vars(a), results)


if __name__ == "__main__":
    main()
