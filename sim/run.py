"""``python -m sim.run``: the MegaFocus study, end to end.

1. label: stream training documents through the focus loop, write counterfactual traces;
2. train: LensNet on those traces (validation on a held-out split of them);
3. evaluate: on held-out documents, the LensNet-driven allocator against the baselines at the
   same W_max — recency, random scores, all-coarse, and the greedy counterfactual oracle — plus
   LensNet's metrics on labelled held-out snapshots;
4. report: ``results.json`` (and the table printed), ``config.json``, the command, versions,
   ``metrics.jsonl`` (training curves), checkpoints and plots, all in ``--out``.

Everything derives from ``--seed``. ``--env synthetic`` (default) uses the exact synthetic world.
(This CLI orchestrates every package, so it imports ``lensnet``; the simulation core does not.)
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from lensnet.train import TrainConfig
from sim.cli import parse, to_dict
from sim.labels import TraceArgs, generate_traces
from sim.policies import (
    AllCoarse,
    GreedyOracle,
    RandomScores,
    Recency,
    evaluate_policy,
    nll_gap_recovered,
)
from sim.tree import ConfigError
from sim.working_context import BudgetExhausted
from sim.world import WorldConfig

HELD_OUT_FIRST_DOC = 1_000_000  # held-out documents never overlap training ones


def _default_train() -> TrainConfig:
    return TrainConfig(lr=1e-3, warmup_steps=100, total_steps=1500, eval_every=250, ckpt_every=500, batch_size=16)


@dataclass
class RunArgs:
    """Run the MegaFocus study: label traces, train LensNet, evaluate policies on held-out documents."""

    env: Literal["synthetic"] = "synthetic"
    """World: the exact synthetic world (the real-LM study is not wired in yet)."""
    seed: int = 0
    """The one seed of the run; documents, model init, data order and baselines derive from it."""
    out: str = "runs/synthetic"
    """Run directory (created; files in it are overwritten)."""
    train_docs: int = 32
    """Training documents to label."""
    eval_docs: int = 8
    """Held-out documents for the policy comparison and LensNet's held-out metrics."""
    preset: Literal["tiny", "small", "seed"] = "small"
    """LensNet size."""
    progress: bool = True
    """Progress bars."""
    plots: bool = True
    """Draw the analysis plots into OUT/plots at the end."""
    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainConfig = field(default_factory=_default_train)


def versions() -> dict:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "transformers": version("transformers"), "gymnasium": version("gymnasium"),
            "machine": platform.machine(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def format_table(results: dict) -> str:
    rows = ["policy        NLL (± sd over docs)   NGR     budget use  swaps/step  ms/step"]
    for name, r in results["policies"].items():
        ngr = "   -  " if r["ngr"] is None else f"{r['ngr']:6.3f}"
        rows.append(f"{name:<12} {r['nll']:8.4f} ± {r['nll_std_over_docs']:.4f}     {ngr}   "
                    f"{r['budget_use']:8.3f}   {r['swap_rate']:8.3f}   {r['ms_per_step']:7.2f}")
    m = results["lensnet_metrics"]
    fmt = lambda v: "None" if v is None else f"{v:.4f}"  # noqa: E731
    rows.append(f"LensNet held-out: ranking accuracy {fmt(m['ranking_accuracy'])}, pearson {fmt(m['pearson'])}, "
                f"legality compliance {fmt(m['legality_compliance'])} (raw {fmt(m['legality_compliance_raw'])})")
    return "\n".join(rows)


def run(args: RunArgs) -> dict:
    import torch

    from lensnet.data import TraceDataset
    from lensnet.losses import LensNetLoss
    from lensnet.policy import LensNetPolicy
    from lensnet.train import Trainer, evaluate, model_config_for, split_indices
    from sim.traces import TraceReader

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "command.txt").write_text(" ".join(["python -m sim.run", *sys.argv[1:]]) + "\n")
    (out / "config.json").write_text(json.dumps(to_dict(args), indent=1))
    (out / "versions.json").write_text(json.dumps(versions(), indent=1))
    w, t_start = args.world, time.perf_counter()
    timings = {}

    # 1. traces (resumable: a rerun with the same config reuses complete shards)
    t0 = time.perf_counter()
    common = dict(seed=args.seed, world=w, progress=args.progress)
    train_dir = generate_traces(TraceArgs(out=str(out / "traces" / "train"), n_docs=args.train_docs, **common))
    heldout_dir = generate_traces(TraceArgs(out=str(out / "traces" / "heldout"), n_docs=args.eval_docs,
                                            first_doc=HELD_OUT_FIRST_DOC, **common))
    timings["label_s"] = time.perf_counter() - t0

    # 2. LensNet
    t0 = time.perf_counter()
    reader = TraceReader(train_dir, require_complete=True)
    train_idx, val_idx = split_indices(len(reader), 0.1, args.seed)
    train_set = TraceDataset(reader, train_idx, augment=args.train.augment, seed=args.seed)
    val_set = TraceDataset(reader, val_idx)
    mcfg = model_config_for(args.preset, w.tree.d_model, w.tree.max_level, w.tree.block_size)
    trainer = Trainer(mcfg, replace(args.train, seed=args.seed), train_set, val_set, out, progress=args.progress)
    trainer.train()
    timings["train_s"] = time.perf_counter() - t0
    model = trainer.model.eval()
    heldout = TraceDataset(TraceReader(heldout_dir, require_complete=True))
    lens_metrics = evaluate(model, LensNetLoss(max_level=w.tree.max_level), heldout, 16, trainer.device)
    lens_metrics = {k.removeprefix("val/"): v for k, v in lens_metrics.items()}

    # 3. policies on held-out documents, same W_max
    t0 = time.perf_counter()
    docs = list(range(HELD_OUT_FIRST_DOC, HELD_OUT_FIRST_DOC + args.eval_docs))
    focus_log = (out / "focus.jsonl").open("w")

    def log_step(name, ep, actions):
        if ep.doc_id == docs[0]:  # one document's focus trajectory per policy, for the heat map
            focus_log.write(json.dumps({"policy": name, "T": ep.wc.n_tokens, "levels": ep.wc.levels.tolist(),
                                        "starts": ep.wc.starts.tolist()}) + "\n")

    policies = [Recency(), AllCoarse(), RandomScores(np.random.default_rng([args.seed, 7])),
                GreedyOracle(), LensNetPolicy(model, trainer.device)]
    torch.set_grad_enabled(False)
    per_policy = {p.name: evaluate_policy(p, w, docs, args.seed, args.progress, on_step=log_step) for p in policies}
    torch.set_grad_enabled(True)
    focus_log.close()
    timings["eval_s"] = time.perf_counter() - t0
    ngr = nll_gap_recovered(per_policy)
    for name, r in per_policy.items():
        r["ngr"] = ngr[name]
    results = {
        "env": args.env, "seed": args.seed, "w_max": w.context.w_max,
        "policies": {k: per_policy[k] for k in ("lensnet", "recency", "random", "all_coarse", "oracle")},
        "lensnet_metrics": lens_metrics,
        "lensnet_params": model.n_params(),
        "train_snapshots": len(train_idx), "heldout_snapshots": len(heldout),
        "heldout_docs": [docs[0], docs[-1]],
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.plots:
        from analysis.plots import draw_all

        draw_all(out)
    print(format_table(results))
    print(f"\nrun directory: {out}  (results.json, metrics.jsonl, checkpoints{', plots/' if args.plots else ''})")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse(RunArgs, argv)
    try:
        run(args)
    except (ConfigError, BudgetExhausted) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
