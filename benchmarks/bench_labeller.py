"""Counterfactual labelling with the real LM: KV-prefix fast path vs naive recompute, same run.

Usage: ``python -m benchmarks.bench_labeller [--widths 128 256] [--horizon 64] [--lm smollm2]``.
For each W: a focused working context over pydoc text (mean-pool gists; the numbers here are about
speed, not label quality), every legal single action as a variant, NLL of the next H tokens for
all of them with ``fast=True`` and ``fast=False``. Reports counterfactual evaluations per second,
the speed ratio, and the fast path against its physical limit: positions it had to recompute
divided by the plain forward throughput (tokens/s) of the same model on this machine, same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import write_results
from megacontext.allocator import FocusAllocator
from megacontext.labels import counterfactual_contexts
from megacontext.lm import load_lm, pydoc_token_ids
from megacontext.lm_oracle import LMOracle
from megacontext.tree import MegaContextTree, TreeConfig
from megacontext.working_context import ContextConfig, WorkingContext


def plain_tokens_per_s(oracle: LMOracle, length: int, batch: int, repeats: int = 3) -> float:
    """Throughput of an ordinary batched forward (the limit's denominator)."""
    x = torch.randn(batch, length, oracle.d_model, dtype=oracle.dtype, device=oracle.device)
    pos = torch.arange(length, device=oracle.device)[None].expand(batch, -1)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            oracle.decoder(
                inputs_embeds=x,
                position_ids=pos,
                attention_mask=torch.ones(batch, length, dtype=torch.long),
            )
            best = min(best, time.perf_counter() - t0)
    return batch * length / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--horizon", type=int, default=64)
    ap.add_argument("--lm", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    model, tok = load_lm(a.lm, device=a.device)
    results = {}
    for w in a.widths:
        tail = min(128, w // 2)
        t = 8 * w
        ids = pydoc_token_ids(tok)[: t + a.horizon]
        fast = LMOracle(model, batch_size=a.batch_size, fast=True)
        naive = LMOracle(model, batch_size=a.batch_size, fast=False)
        tree = MegaContextTree(TreeConfig(block_size=32, max_level=2, d_model=fast.d_model))
        tree.ingest(ids[:t], fast.token_embeddings(ids[:t]))
        wc = WorkingContext(tree, ContextConfig(w_max=w, tail_tokens=tail))
        wc.append_tokens(t)
        alloc = FocusAllocator()
        alloc.enforce_budget(wc)
        rng = np.random.default_rng(a.seed)
        for _ in range(8):
            alloc.step(wc, rng.normal(size=len(wc)))
        base, variants = counterfactual_contexts(wc, 6)
        ctxs = [base, *(v for _, _, v in variants)]
        q = ids[t : t + a.horizon]
        fast.nll(ctxs[:2], q, t)  # warm-up
        fast.positions_recomputed = 0
        t0 = time.perf_counter()
        nll_fast = fast.nll(ctxs, q, t)
        fast_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        nll_naive = naive.nll(ctxs, q, t)
        naive_s = time.perf_counter() - t0
        err = float(np.abs(nll_fast - nll_naive).max())
        assert err < 1e-3, err
        tps = plain_tokens_per_s(fast, len(base.levels) + a.horizon, a.batch_size)
        limit_s = fast.positions_recomputed / tps
        results[f"W={w}"] = {
            "entries": len(base.levels),
            "variants": len(variants),
            "tail": tail,
            "tokens": t,
            "fast_s": fast_s,
            "naive_s": naive_s,
            "speedup_vs_naive": naive_s / fast_s,
            "fast_evals_per_s": len(ctxs) / fast_s,
            "naive_evals_per_s": len(ctxs) / naive_s,
            "positions_recomputed_fast": fast.positions_recomputed,
            "positions_recomputed_naive": naive.positions_recomputed,
            "plain_forward_tokens_per_s": tps,
            "limit_s": limit_s,
            "fast_over_limit": fast_s / limit_s,
            "max_abs_diff_fast_vs_naive": err,
        }
        print(w, results[f"W={w}"], flush=True)
    write_results(
        "labeller_" + ("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu"),
        vars(a),
        results,
    )


if __name__ == "__main__":
    main()
