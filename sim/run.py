"""``python -m sim.run``: the MegaFocus study, end to end.

1. label: stream training documents through the focus loop, write counterfactual traces;
2. train: LensNet on those traces (validation on a held-out split of them);
3. evaluate: on held-out documents, the LensNet-driven allocator against the baselines at the
   same W_max — recency, random scores, all-coarse, and the greedy counterfactual oracle — plus
   LensNet's metrics on labelled held-out snapshots;
4. report: ``results.json`` (and the table printed), ``config.json``, the command, versions,
   ``metrics.jsonl`` (training curves), checkpoints and plots, all in ``--out``.

Everything derives from ``--seed``. ``--env synthetic`` (default) uses the exact synthetic world;
``--env lm`` runs the same study with the real LM over pydoc text (training documents from the
training topics, held-out ones from the held-out topics), with small defaults (``lm_defaults``) so it
finishes on a CPU in minutes. Every policy is also evaluated at the budgets ``--budget-scales`` x
W_max (the NLL-gap vs budget plot), reusing the one LensNet trained at W_max.
(This CLI orchestrates every package, so it imports ``lensnet``; the simulation core does not.)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

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
from sim.synthetic import SyntheticConfig
from sim.tree import ConfigError, MegaContextTree, TreeConfig
from sim.working_context import BudgetExhausted, ContextConfig, WorkingContext, min_slots
from sim.world import HELD_OUT_FIRST_DOC, WorldConfig, lm_episode, synthetic_episode


def _default_train() -> TrainConfig:
    return TrainConfig(lr=1e-3, warmup_steps=100, total_steps=1500, eval_every=250, ckpt_every=500, batch_size=16)


@dataclass
class RunArgs:
    """Run the MegaFocus study: label traces, train LensNet, evaluate policies on held-out documents."""

    env: Literal["synthetic", "lm"] = "synthetic"
    """World: the exact synthetic world, or the real LM over pydoc text ('lm' brings its own small defaults)."""
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
    budget_scales: tuple[float, ...] = (0.625, 0.75, 0.875, 1.25)
    """Also evaluate every policy at these multiples of W_max (budgets too small for the document are skipped)."""
    lm: str = "smollm2"
    """With --env lm: 'smollm2', 'tiny' (random-init test LM) or a local model folder."""
    lm_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """With --env lm: the LM's dtype ('auto': float32 on CPU, bfloat16 on CUDA)."""
    select: Literal["best", "final"] = "best"
    """LensNet weights that are evaluated: the checkpoint with the lowest validation loss (validation = 10% of the training snapshots, never held-out documents), or the last step's."""
    progress: bool = True
    """Progress bars."""
    plots: bool = True
    """Draw the analysis plots into OUT/plots at the end."""
    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainConfig = field(default_factory=_default_train)


def lm_defaults() -> RunArgs:
    """Defaults of ``--env lm``: 384-token documents (so L1 is the top level: an L2 gist needs 1 024
    tokens), W_max 96 with a 32-token tail (room for one expanded block beside the coarsest cover
    at every step), H = 32, 8 + 2 documents, 400 LensNet steps, one extra budget (1.5 x W_max: three
    blocks). Labelling with SmolLM2 costs a few seconds per snapshot on 2 cores, and so does each
    step of the greedy oracle policy."""
    world = WorldConfig(env="lm", horizon=32, warmup_tokens=128, n_tail=4,
                        tree=TreeConfig(block_size=32, max_level=1, d_model=576),
                        context=ContextConfig(w_max=96, tail=32),
                        synthetic=SyntheticConfig(n_blocks=12))
    train = TrainConfig(lr=1e-3, warmup_steps=40, total_steps=400, eval_every=100, ckpt_every=200, batch_size=16)
    return RunArgs(env="lm", out="runs/lm", train_docs=8, eval_docs=2, preset="small", budget_scales=(1.5,),
                   world=world, train=train)


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


def expansion_room(w: WorldConfig) -> tuple[int, int]:
    """(refocus steps at which one L1 expansion fits W_max beside the coarsest legal cover, all
    refocus steps). With none, no policy can do anything but the recency cover: the study is void."""
    b, doc_tokens = w.tree.block_size, w.synthetic.n_blocks * w.tree.block_size
    first = max(w.warmup_tokens, w.step_tokens)
    cursors = range(first, doc_tokens - w.horizon + 1, w.step_tokens)
    fits = sum(min_slots(t, b, w.tree.max_level, w.context.tail) + b - 1 <= w.context.w_max for t in cursors)
    return fits, len(cursors)


def _room_note(w: WorldConfig) -> str | None:
    fits, steps = expansion_room(w)
    if fits == steps:
        return None
    what = "at no refocus step" if fits == 0 else f"at only {fits} of {steps} refocus steps"
    note = f"W_max={w.context.w_max}: an expansion (+{w.tree.block_size - 1} slots) fits {what}"
    return note + ("; every policy reduces to the recency cover there" if fits == 0 else "")


def _budgets(args: RunArgs, w: WorldConfig) -> tuple[list[int], list[str]]:
    """The W_max values of the sweep (the run's own first) and notes on the ones skipped, or
    where focus has little or no room to act."""
    base = w.context.w_max
    budgets, notes = [base], []
    if (note := _room_note(w)) is not None:
        notes.append(note)
    for scale in args.budget_scales:
        b = int(round(scale * base))
        if b in budgets:
            continue
        try:  # the world's document check, then the context's own (tail + a coarse cover must fit)
            wb = replace(w, context=replace(w.context, w_max=b))
            WorkingContext(MegaContextTree(wb.tree), wb.context)
        except ConfigError as err:
            notes.append(f"W_max={b} (x{scale}) skipped: {err}")
            continue
        budgets.append(b)
        if (note := _room_note(wb)) is not None:
            notes.append(note)
    return budgets, notes


def run(args: RunArgs) -> dict:
    import torch

    from lensnet.data import TraceDataset
    from lensnet.policy import LensNetPolicy
    from lensnet.train import Trainer, evaluate, model_config_for, split_indices
    from sim.traces import TraceReader

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "command.txt").write_text(" ".join(["python -m sim.run", *sys.argv[1:]]) + "\n")
    (out / "config.json").write_text(json.dumps(to_dict(args), indent=1))
    (out / "versions.json").write_text(json.dumps(versions(), indent=1))
    w, t_start = replace(args.world, env=args.env), time.perf_counter()
    timings = {}

    lm = None
    if args.env == "lm":  # one frozen LM for labelling and evaluation; the tree takes its width
        from gistnet.gister import resolve_gister
        from sim.lm import load_lm
        from sim.lm_oracle import LMOracle

        if not args.progress:  # transformers' own weight-loading bars too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        lm_model, tokenizer = load_lm(args.lm, dtype=None if args.lm_dtype == "auto" else getattr(torch, args.lm_dtype))
        oracle = LMOracle(lm_model)
        lm = (lm_model, tokenizer)
        w = replace(w, tree=replace(w.tree, d_model=oracle.d_model))
        gister, gister_name = resolve_gister(w.gister, lm_model, w.tree.block_size)
        w = replace(w, gister=gister_name)  # recorded as what was used

        def make_episode(world, doc, seed):
            return lm_episode(world, doc, seed, oracle, tokenizer, gister)
    else:
        def make_episode(world, doc, seed):
            return synthetic_episode(world, doc, seed)[0]

    budgets, budget_notes = _budgets(args, w)
    for note in budget_notes:
        print(note)

    # 1. traces (resumable: a rerun with the same config reuses complete shards)
    t0 = time.perf_counter()
    common = dict(seed=args.seed, world=w, progress=args.progress, lm=args.lm)
    train_dir = generate_traces(TraceArgs(out=str(out / "traces" / "train"), n_docs=args.train_docs, **common), lm=lm)
    heldout_dir = generate_traces(TraceArgs(out=str(out / "traces" / "heldout"), n_docs=args.eval_docs,
                                            first_doc=HELD_OUT_FIRST_DOC, **common), lm=lm)
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
    lensnet_step = trainer.step
    if args.select == "best" and math.isfinite(trainer.best):  # best.pt is this run's (best starts at inf)
        from lensnet.train import load_checkpoint

        ckpt = load_checkpoint(out / "best.pt", trainer.device)
        trainer.model.load_state_dict(ckpt["model"])
        lensnet_step = int(ckpt["step"])
    model = trainer.model.eval()
    heldout = TraceDataset(TraceReader(heldout_dir, require_complete=True))
    lens_metrics = evaluate(model, trainer.loss_fn, heldout, 16, trainer.device)
    lens_metrics = {k.removeprefix("val/"): v for k, v in lens_metrics.items()}

    # 3. policies on held-out documents: the run's W_max, then the other budgets of the sweep
    t0 = time.perf_counter()
    docs = list(range(HELD_OUT_FIRST_DOC, HELD_OUT_FIRST_DOC + args.eval_docs))
    focus_log = (out / "focus.jsonl").open("w")
    refs = _referenced_blocks(w, docs[0], args.seed) if args.env == "synthetic" else None

    def log_step(name, ep, actions):
        if ep.doc_id == docs[0]:  # one document's focus trajectory per policy, for the heat map
            rec = {"policy": name, "T": ep.wc.n_tokens, "levels": ep.wc.levels.tolist(),
                   "starts": ep.wc.starts.tolist()}
            if refs is not None:  # the blocks the next H tokens refer to (what focus should serve)
                rec["referenced"], rec["block_size"] = refs(ep.wc.n_tokens), ep.wc.block_size
            focus_log.write(json.dumps(rec) + "\n")

    sweep: dict[str, dict] = {}
    torch.set_grad_enabled(False)
    for budget in tqdm(budgets, desc="budgets", disable=not args.progress or len(budgets) == 1):
        wb = replace(w, context=replace(w.context, w_max=budget))
        policies = [Recency(), AllCoarse(), RandomScores(np.random.default_rng([args.seed, 7])),
                    GreedyOracle(), LensNetPolicy(model, trainer.device)]
        per_policy = {p.name: evaluate_policy(p, wb, docs, args.seed, args.progress, episode_factory=make_episode,
                                              on_step=log_step if budget == w.context.w_max else None)
                      for p in policies}
        ngr = nll_gap_recovered(per_policy)
        for name, r in per_policy.items():
            r["ngr"] = ngr[name]
        sweep[str(budget)] = {k: per_policy[k] for k in ("lensnet", "recency", "random", "all_coarse", "oracle")}
    torch.set_grad_enabled(True)
    focus_log.close()
    timings["eval_s"] = time.perf_counter() - t0
    results = {
        "env": args.env, "seed": args.seed, "w_max": w.context.w_max,
        "gister": w.gister if args.env == "lm" else "mean (synthetic world)",
        "policies": sweep[str(w.context.w_max)],
        "lensnet_metrics": lens_metrics,
        "lensnet_params": model.n_params(),
        "lensnet_step": lensnet_step, "lensnet_select": args.select,
        "train_snapshots": len(train_idx), "heldout_snapshots": len(heldout),
        "heldout_docs": [docs[0], docs[-1]],
        "budget_sweep": {b: {name: {k: r[k] for k in ("nll", "nll_std_over_docs", "ngr", "budget_use", "swap_rate")}
                             for name, r in pols.items()} for b, pols in sweep.items()},
        "budget_notes": budget_notes,
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.plots:
        from analysis.plots import draw_all

        draw_all(out)
    print(format_table(results))
    print(f"\nrun directory: {out}  (results.json, metrics.jsonl, checkpoints{', plots/' if args.plots else ''})")
    return results


def _referenced_blocks(w: WorldConfig, doc_id: int, seed: int):
    """T -> the L1 blocks that the H query tokens after cursor T refer to (synthetic world)."""
    doc = synthetic_episode(w, doc_id, seed)[1]
    b = w.tree.block_size

    def refs(t: int) -> list[int]:
        blocks = range(t // b, min((t + w.horizon - 1) // b + 1, len(doc.ref_blocks)))
        return sorted({int(r) for q in blocks for r in doc.ref_blocks[q]})

    return refs


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default="synthetic")
    env = pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].env
    args = parse(RunArgs, argv, defaults=lm_defaults() if env == "lm" else None)
    try:
        run(args)
    except (ConfigError, BudgetExhausted) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
