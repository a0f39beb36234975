"""LensNet training throughput: steps/s of the training step before and after the folded forward,
same run, same batches, same machine; with the torch.profiler top entries of both.

Usage: ``python -m benchmarks.bench_train [--docs 8] [--threads 2 1] [--block 10] [--repeats 5]
[--seed 0]
[--devices cpu cuda]``. Writes ``benchmarks/results/train_throughput.json``.

Setting: ``make run``'s CPU default — synthetic traces of the default world (W_max 256, b 32,
labelled by ``sim.labels``; ``--docs`` documents, which sets how many snapshots there are to draw
from, not their size), preset ``small`` (0.94 M parameters), ``sim.run``'s default TrainConfig
(batch 16, augmentation on), at each of ``--threads`` (torch CPU threads). One step is the body of
``TrainLoop.train``'s loop: collate the (seed, step) batch, forward, the four losses, backward,
clipping, AdamW, schedule (periodic validation and checkpoints left out). ``before`` runs the step
with ``LensNet.reference_forward`` (the
forward as it was: padded entries through ``nn.MultiheadAttention``), ``after`` with
``LensNet.forward``; the data path, loss and optimiser are shared. The two trainers start from the
same parameters and alternate blocks of ``--block`` steps, ``--repeats`` times, so machine load
hits both alike; steps/s is the median over blocks, the ratio is after / before. Their losses on
the first steps are compared (they compute the same function: equal up to float rounding).
Wall-clock: on a shared machine, read the ratio, and the load average recorded beside it. With
other processes on the cores, OpenMP's default spin-waiting makes every multi-threaded op wait for a
descheduled thread (seen here: AdamW on 0.94 M parameters at 400 ms instead of 7 ms); run with
``OMP_WAIT_POLICY=PASSIVE`` there (recorded in the results) or on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import write_results
from lensnet.data import TraceDataset
from lensnet.model import LensNet
from lensnet.train import Trainer, model_config_for, split_indices
from megacontext.traces import TraceReader
from sim.labels import TraceArgs, generate_traces
from sim.run import _default_train
from sim.streamworld.world import WorldConfig


class ReferenceForward(nn.Module):
    """The training step's model call routed to ``LensNet.reference_forward`` (the old forward)."""

    def __init__(self, model: LensNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.reference_forward(batch)


def make_trainers(reader: TraceReader, device: str, seed: int, out: Path) -> dict[str, Trainer]:
    """Two identical trainers ('before', 'after'); evaluation and checkpoints never fall in a block.
    """
    w = WorldConfig()
    train_idx, _ = split_indices(reader.snapshots["doc_id"], 0.1, seed)
    cfg = replace(
        _default_train(),
        seed=seed,
        device=device,
        eval_every=10**9,
        ckpt_every=10**9,
        total_steps=10**6,
    )
    mcfg = model_config_for("small", reader.d_model, w.tree.max_level, w.tree.block_size)
    trainers = {}
    for name in ("before", "after"):
        data = TraceDataset(reader, train_idx, augment=cfg.augment, seed=seed)
        trainers[name] = Trainer(mcfg, cfg, data, None, out / name, progress=False)
    trainers["before"].train_model = ReferenceForward(trainers["before"].model)
    return trainers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_steps(trainer: Trainer, steps: int) -> list[float]:
    """``steps`` training steps as ``TrainLoop.train`` runs them; returns their total losses."""
    params = [p for g in trainer.opt.param_groups for p in g["params"]]
    losses = []
    for _ in range(steps):
        loss, terms = trainer.loss(trainer.batch(trainer.step))
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, trainer.config.grad_clip)
        trainer.opt.step()
        trainer.sched.step()
        trainer.step += 1
        losses.append(terms["loss/total"])
    return losses


def time_block(trainer: Trainer, steps: int, device: str) -> float:
    """Steps/s over ``steps`` training steps."""
    _sync(device)
    t0 = time.perf_counter()
    run_steps(trainer, steps)
    _sync(device)
    return steps / (time.perf_counter() - t0)


def phases(trainer: Trainer, steps: int, device: str) -> dict[str, float]:
    """Mean ms per step in each phase of the step (synchronised on CUDA)."""
    acc = {"data": 0.0, "forward": 0.0, "loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    params = [p for g in trainer.opt.param_groups for p in g["params"]]
    for _ in range(steps):
        marks = [time.perf_counter()]
        batch = trainer.batch(trainer.step)
        _sync(device)
        marks.append(time.perf_counter())
        pred = trainer.train_model(batch)
        _sync(device)
        marks.append(time.perf_counter())
        loss = trainer.loss_fn(pred, batch)["loss"]
        marks.append(time.perf_counter())
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, trainer.config.grad_clip)
        trainer.opt.step()
        trainer.sched.step()
        trainer.step += 1
        _sync(device)
        marks.append(time.perf_counter())
        for key, a, b in zip(acc, marks, marks[1:], strict=False):
            acc[key] += (b - a) * 1e3 / steps
    return acc


def profile_top(trainer: Trainer, steps: int, device: str, top: int = 12) -> list[dict]:
    """torch.profiler's top ops by self time (CPU, or CUDA kernels on a GPU), per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        run_steps(trainer, steps)
        _sync(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    return [
        {
            "op": e.key,
            "self_ms_per_step": getattr(e, key) / 1e3 / steps,
            "share": getattr(e, key) / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[:top]
    ]


def bench_device(reader: TraceReader, device: str, a: argparse.Namespace, out: Path) -> dict:
    trainers = make_trainers(reader, device, a.seed, out)
    after = trainers["after"]
    # same parameters, same batches: the first steps' losses must agree
    losses = {name: run_steps(tr, 3) for name, tr in trainers.items()}
    rates: dict[str, list[float]] = {"before": [], "after": []}
    load = [os.getloadavg()[0]]
    for _ in range(a.repeats):
        for name, tr in trainers.items():
            rates[name].append(time_block(tr, a.block, device))
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in rates.items()}
    batch = after.batch(after.step)
    with (
        torch.no_grad()
    ):  # trained parameters (the head is no longer 0): both forwards on one batch
        fast, ref = after.model(batch), after.model.reference_forward(batch)
        loss_fast, loss_ref = (
            after.loss_fn(fast, batch)["loss"].item(),
            after.loss_fn(ref, batch)["loss"].item(),
        )
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "steps_per_s_before": med["before"],
        "steps_per_s_after": med["after"],
        "speedup": med["after"] / med["before"],
        "steps_per_s_blocks": rates,
        "first_step_losses": losses,
        "max_first_loss_rel_diff": max(
            abs(x - y) / abs(y) for x, y in zip(losses["after"], losses["before"], strict=True)
        ),
        "trained_scores_max_abs_diff": (fast - ref).abs().max().item(),
        "trained_scores_max_abs": ref.abs().max().item(),
        "trained_loss_rel_diff": abs(loss_fast - loss_ref) / abs(loss_ref),
        "phases_ms_per_step": {name: phases(tr, a.block, device) for name, tr in trainers.items()},
        "profile_top": {
            name: profile_top(tr, a.profile_steps, device) for name, tr in trainers.items()
        },
        "entries_per_batch": int(batch["valid_mask"].sum()),
        "padded_batch_shape": list(batch["valid_mask"].shape),
        "params": after.model.n_params(),
        "steps_run": after.step,
        "load_average_1min": load,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=8, help="training documents to label")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="torch CPU threads (2: make run's default on 2 cores)",
    )
    ap.add_argument("--block", type=int, default=10, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per variant (alternating)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    ap.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    t0 = time.perf_counter()
    traces = generate_traces(
        TraceArgs(
            out=str(tmp / "traces"), n_docs=a.docs, seed=a.seed, world=WorldConfig(), progress=False
        )
    )
    reader = TraceReader(traces, require_complete=True)
    label_s = time.perf_counter() - t0
    results: dict = {
        "snapshots": len(reader),
        "label_s": label_s,
        "environment_variables": {
            k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
        },
    }
    for device in a.devices:
        if device == "cuda" and not torch.cuda.is_available():
            results["cuda"] = {"skipped": "no CUDA device on this machine"}
            continue
        for threads in a.threads if device == "cpu" else [a.threads[0]]:
            torch.set_num_threads(threads)
            key = f"cpu-{threads}-threads" if device == "cpu" else "cuda"
            results[key] = r = bench_device(reader, device, a, tmp / key)
            print(
                f"{key}: before {r['steps_per_s_before']:.2f} steps/s, after "
                f"{r['steps_per_s_after']:.2f} steps/s, "
                f"x{r['speedup']:.2f} (trained scores max diff "
                f"{r['trained_scores_max_abs_diff']:.1e})"
            )
    write_results(
        "train_throughput",
        {
            **vars(a),
            "preset": "small",
            "world": "WorldConfig() defaults",
            "train": "sim.run._default_train()",
        },
        results,
        a.out_dir,
    )


if __name__ == "__main__":
    main()
