"""CUDA checks for a GPU machine: the LM oracle and LensNet training on the device.

Usage: ``python -m benchmarks.device_check [--out DIR]``. Runs (1) the tiny LM oracle on CUDA in
fp32
and bf16: fast path vs naive recompute on counterfactual variants and all-L0 vs a plain forward;
(2) a short LensNet training run on CUDA with a resume check; (3) the LensNet loss forward+backward
at B=16, N=1024 on CUDA. Writes ``device_check.json``. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment


def lm_checks(dtype: torch.dtype, device: str) -> dict:
    from megacontext.allocator import FocusAllocator
    from megacontext.labels import counterfactual_contexts
    from megacontext.lm import tiny_llama
    from megacontext.lm_oracle import LMOracle
    from megacontext.tree import MegaContextTree, TreeConfig
    from megacontext.working_context import ContextConfig, WorkingContext

    model = tiny_llama(dtype=dtype).to(device)
    fast, naive = LMOracle(model, batch_size=6), LMOracle(model, batch_size=6, fast=False)
    ids = np.random.default_rng(0).integers(0, 512, 300)
    t, h = 256, 32
    tree = MegaContextTree(TreeConfig(block_size=8, max_level=2, d_model=fast.d_model))
    tree.ingest(ids[:t], fast.token_embeddings(ids[:t]))
    wc = WorkingContext(tree, ContextConfig(w_max=80, tail_tokens=16))
    wc.append_tokens(t)
    alloc = FocusAllocator()
    alloc.enforce_budget(wc)
    rng = np.random.default_rng(1)
    for _ in range(6):
        alloc.step(wc, rng.normal(size=len(wc)))
    base, variants = counterfactual_contexts(wc, 3)
    ctxs = [base, *(v for _, _, v in variants)]
    a, b = fast.nll(ctxs, ids[t : t + h], t), naive.nll(ctxs, ids[t : t + h], t)
    roomy = WorkingContext(tree, ContextConfig(w_max=t, tail_tokens=16))
    roomy.append_tokens(t)
    x = torch.as_tensor(ids[: t + h], device=device)[None]
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    plain = torch.nn.functional.cross_entropy(logits[t - 1 : t + h - 1], x[0, t : t + h]).item()
    got = fast.nll([roomy.arrays()], ids[t : t + h], t)[0]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return {
        "dtype": str(dtype),
        "variants": len(variants),
        "max_fast_vs_naive": float(np.abs(a - b).max()),
        "all_l0_vs_plain": abs(got - plain),
        "tolerance": tol,
        "ok": bool(np.abs(a - b).max() < tol and abs(got - plain) < tol),
    }


def lensnet_checks(device: str) -> dict:
    """LensNet on ``device``: a short training run on a synthetic trace with a resume check, and
    the loss forward + backward at B=16, N=1024. Long by design: one scripted check read top to
    bottom, its steps sharing one trace."""
    from lensnet.data import AugmentConfig, TraceDataset
    from lensnet.model import LensNetConfig
    from lensnet.train import TrainConfig, Trainer
    from megacontext.traces import TraceReader, TraceWriter

    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    w = TraceWriter(tmp / "t", {"d_model": 16, "n_tail": 3})
    for _ in range(32):
        n = int(rng.integers(20, 60))
        lv = rng.integers(0, 3, n)
        emb = rng.normal(size=(n, 16)).astype(np.float32)
        act = (lv >= 1) | (rng.random(n) < 0.5)
        y = np.where(act, 2 * emb[:, 0], 0.0)
        w.add(
            {
                "embeddings": emb,
                "levels": lv,
                "node_index": np.arange(n),
                "span_start": np.arange(n),
                "span_width": 4**lv,
                "distance_to_cursor": np.arange(n)[::-1],
                "position_ids": np.arange(n),
                "can_expand": lv >= 1,
                "can_collapse": act & (lv < 2),
                "group_id": -np.ones(n, dtype=np.int64),
                "expand_cost": np.where(lv >= 1, 3.0, 0),
                "collapse_refund": np.where(act & (lv < 2), 0.75, 0),
                "expand_gain": np.clip(y, 0, None),
                "collapse_cost": np.clip(-y, 0, None),
                "target_utilities": y,
                "action_mask": act,
                "tail_gists": rng.normal(size=(3, 16)),
                "tail_levels": np.array([2, 1, 1]),
                "tail_mask": np.ones(3, dtype=bool),
                "n_tokens": np.int64(n),
                "baseline_nll": np.float32(1),
                "doc_id": np.int64(0),
            }
        )
    w.close()
    reader = TraceReader(tmp / "t")
    mk = lambda name: Trainer(  # noqa: E731
        LensNetConfig(d_model=16, d_lens=64, n_heads=4, n_stacks=2, dropout=0.1, block_size=4),
        TrainConfig(
            lr=1e-3,
            batch_size=8,
            warmup_steps=5,
            total_steps=60,
            eval_every=20,
            ckpt_every=30,
            device=device,
        ),
        TraceDataset(reader, np.arange(28), augment=AugmentConfig()),
        TraceDataset(reader, np.arange(28, 32)),
        tmp / name,
        progress=False,
    )
    full = mk("full")
    t0 = time.perf_counter()
    res = full.train()
    secs = time.perf_counter() - t0
    part = mk("part")
    part.train(until=30)
    resumed = mk("part")
    resumed.resume(tmp / "part" / "step-0000030.pt")
    resumed.train()
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
        )
    )
    log = [json.loads(x) for x in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    return {
        "device": str(full.device),
        "first_loss": log[0]["loss/total"],
        "last_loss": log[-1]["loss/total"],
        "val": res,
        "steps_per_s": 60 / secs,
        "resume_bitwise_equal": same,
        "ok": bool(
            log[-1]["loss/total"] < log[0]["loss/total"] and full.device.type == device and same
        ),
    }


def loss_timing() -> dict:
    from lensnet.losses import LensNetLoss

    b, n = 16, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    lv = torch.randint(0, 3, (b, n), device="cuda", generator=g)
    batch = {
        "target_utilities": torch.randn(b, n, device="cuda", generator=g),
        "action_mask": torch.rand(b, n, device="cuda", generator=g) < 0.8,
        "valid_mask": torch.ones(b, n, dtype=torch.bool, device="cuda"),
        "levels": lv,
        "span_width": (32.0**lv),
        "expand_cost": torch.where(lv >= 1, 31.0, 0.0),
        "collapse_refund": torch.full((b, n), 31 / 32, device="cuda"),
    }
    pred = torch.randn(b, n, device="cuda", generator=g, requires_grad=True)
    f = LensNetLoss()
    for _ in range(3):
        f(pred, batch)["loss"].backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        f(pred, batch)["loss"].backward()
    torch.cuda.synchronize()
    return {"B": b, "N": n, "fwd_bwd_ms": (time.perf_counter() - t0) / 20 * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument(
        "--device", default="cuda", help="cuda (the point), or cpu for a dry run of the script"
    )
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    res = {
        "environment": environment(),
        "lm_fp32": lm_checks(torch.float32, a.device),
        "lm_bf16": lm_checks(torch.bfloat16, a.device),
        "lensnet": lensnet_checks(a.device),
        "loss_cuda": loss_timing() if a.device == "cuda" else None,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "device_check.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))
    if not all(res[k]["ok"] for k in ("lm_fp32", "lm_bf16", "lensnet")):
        sys.exit(1)


if __name__ == "__main__":
    main()
