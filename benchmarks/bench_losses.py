"""LensNet loss benchmark: vectorised ``LensNetLoss`` vs the loop reference, same inputs, same run.

Usage: ``python -m benchmarks.bench_losses [--sizes 128 1024] [--batch 16] [--seed 0]``.
Times forward+backward (value and d loss / d predictions) for both; checks they agree; reports
the speed ratio. Run it on an otherwise idle machine: the timings are wall-clock.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_results
from lensnet import reference_losses as ref
from lensnet.losses import LensNetLoss


def make_batch(
    b: int, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A labelled batch shaped like real traces: 80% labelled, levels 0..2, b=32 costs."""
    levels = torch.randint(0, 3, (b, n), generator=gen)
    action = torch.rand(b, n, generator=gen) < 0.8
    batch = {
        "target_utilities": torch.randn(b, n, generator=gen),
        "action_mask": action,
        "valid_mask": torch.ones(b, n, dtype=torch.bool),
        "levels": levels,
        "span_width": 32.0**levels,
        "expand_cost": torch.where(levels >= 1, 31.0, 0.0),
        "collapse_refund": torch.where(action & (levels < 2), 31 / 32, 0.0),
    }
    return torch.randn(b, n, generator=gen), batch


def time_vectorised(
    pred: torch.Tensor, batch: dict, repeats: int
) -> tuple[float, torch.Tensor, float]:
    loss_fn = LensNetLoss()
    times = []
    for _ in range(repeats + 2):  # two warm-up runs
        p = pred.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = loss_fn(p, batch)
        out["loss"].backward()
        times.append(time.perf_counter() - t0)
    return min(times[2:]), p.grad, out["loss"].item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    results = {}
    for n in a.sizes:
        pred, batch = make_batch(a.batch, n, gen)
        fast_s, fast_grad, fast_loss = time_vectorised(pred, batch, a.repeats)
        lists = {k: v.tolist() for k, v in batch.items()}
        t0 = time.perf_counter()
        want, want_grad = ref.lensnet_loss(pred.tolist(), lists)
        loop_s = time.perf_counter() - t0
        max_grad_err = (fast_grad - torch.tensor(want_grad)).abs().max().item()
        assert abs(fast_loss - want["loss"]) < 1e-4 and max_grad_err < 1e-5, (
            fast_loss,
            want,
            max_grad_err,
        )
        results[f"N={n}"] = {
            "vectorised_fwd_bwd_ms": fast_s * 1e3,
            "loop_fwd_bwd_ms": loop_s * 1e3,
            "speedup": loop_s / fast_s,
            "loss_abs_diff": abs(fast_loss - want["loss"]),
            "max_grad_abs_diff": max_grad_err,
        }
        print(n, results[f"N={n}"])
    write_results("losses", vars(a), results)


if __name__ == "__main__":
    main()
