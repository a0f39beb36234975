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
training topics, held-out ones from the held-out topics), with small defaults (``lm_defaults``) so
it
finishes on a CPU in minutes. Every policy is also evaluated at the budgets ``--budget-scales`` x
W_max (the NLL-gap vs budget plot), reusing the LensNet trained at W_max. ``--train-seeds K`` trains
K LensNets on the same traces (training seeds seed, seed+1, ...; labels, validation split and
baselines computed once) and reports each with the mean and a 95% Student-t interval over them.
(This CLI orchestrates every package, so it imports ``lensnet``; the simulation core does not.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from lensnet.train import TrainConfig
from megacontext.cli import run_cli, to_dict, versions
from megacontext.tree import ConfigError, MegaContextTree, TreeConfig
from megacontext.working_context import BudgetExhausted, ContextConfig, WorkingContext, min_slots
from sim.calibrate import fit_score_scale
from sim.labels import TraceArgs, generate_traces
from sim.policies import LensNetPolicy, build_policy
from sim.policy import PolicyContext
from sim.streamworld.synthetic import SyntheticConfig
from sim.streamworld.world import (
    HELD_OUT_FIRST_DOC,
    WorldConfig,
    evaluate_policy,
    lm_episode,
    nll_gap_recovered,
    synthetic_episode,
)


def _default_train() -> TrainConfig:
    return TrainConfig(
        lr=1e-3, warmup_steps=100, total_steps=1500, eval_every=250, ckpt_every=500, batch_size=16
    )


@dataclass
class RunArgs:
    """Run the MegaFocus study: label traces, train LensNet, evaluate policies on held-out
    documents."""

    env: Literal["synthetic", "lm"] = "synthetic"
    """World: the exact synthetic world, or the real LM over pydoc text ('lm' brings its own small
    defaults)."""
    seed: int = 0
    """The one seed of the run; documents, model init, data order and baselines derive from it."""
    out: str = "runs/synthetic"
    """Run directory (created; files in it are overwritten)."""
    train_docs: int = 128
    """Training documents to label (synthetic labels are exact and cheap; the order LensNet learns
    comes with data)."""
    eval_docs: int = 8
    """Held-out documents for the policy comparison and LensNet's held-out metrics."""
    preset: Literal["tiny", "small", "seed"] = "small"
    """LensNet size."""
    budget_scales: tuple[float, ...] = (0.625, 0.75, 0.875, 1.25)
    """Also evaluate every policy at these multiples of W_max (budgets too small for the document
    are skipped)."""
    lm: str = "smollm2"
    """With --env lm: 'smollm2', 'tiny' (random-init test LM) or a local model folder."""
    lm_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """With --env lm: the LM's dtype ('auto': float32 on CPU, bfloat16 on CUDA)."""
    train_seeds: int = 1
    """LensNets to train on the same traces (training seeds seed, seed+1, ...), each evaluated;
    results.json gives every one plus the mean and a 95% t-interval over them, the table prints mean
    ± half-width (policies.lensnet stays the first seed's)."""
    select: Literal["best", "final"] = "best"
    """LensNet weights that are evaluated: the checkpoint with the lowest validation loss
    (validation = 10% of the training documents, whole, never held-out documents), or the last
    step's."""
    calibrate: bool = True
    """Fit LensNet's score scale (equivalently tau_expand) on the validation documents' episodes at
    W_max, store it in the evaluated checkpoint, and evaluate the calibrated scorer ('lensnet'; the
    raw one is 'lensnet_raw')."""
    calibration_docs: int = 6
    """Validation documents the calibration runs (the first of the validation split by id; each grid
    value runs all of them)."""
    dagger_docs: int = 0
    """DAgger round (0: off): after each training seed's first round, this many further training
    documents (ids after the training ones) are labelled along that LensNet's own focus (its scores
    plus N(0, ``dagger_noise``) move the focus), spread over the sweep's budgets (document d at
    budget d mod their count), so the traces hold the contexts the learned policy visits, which
    random behaviour never reaches (e.g. L2 gists); training then goes on ``dagger_steps`` steps on
    both trace sets (validation: the first round's documents plus a tenth of the new ones)."""
    dagger_steps: int = 500
    """Training steps of the DAgger round (from the first round's selected weights)."""
    dagger_noise: float = 0.05
    """Std of the noise added to LensNet's scores while the DAgger documents are labelled."""
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
    world = WorldConfig(
        env="lm",
        horizon=32,
        warmup_tokens=128,
        n_tail_gists=4,
        tree=TreeConfig(block_size=32, max_level=1, d_model=576),
        context=ContextConfig(w_max=96, tail_tokens=32),
        synthetic=SyntheticConfig(n_blocks=12),
    )
    train = TrainConfig(
        lr=1e-3, warmup_steps=40, total_steps=400, eval_every=100, ckpt_every=200, batch_size=16
    )
    return RunArgs(
        env="lm",
        out="runs/lm",
        train_docs=8,
        eval_docs=2,
        preset="small",
        budget_scales=(1.5,),
        world=world,
        train=train,
    )


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (``df`` >= 1 degrees of freedom) at ``p`` in (0.5, 1):
    bisection on the CDF, the density integrated by Simpson's rule (error well below 1e-6)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return 0.5 + (t[1] - t[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Sequence[float | None], level: float = 0.95) -> dict:
    """Mean and two-sided Student-t interval of independent runs' values: ``n``, ``mean``, ``sd``,
    ``half_width``, ``low``, ``high`` (the last four None with fewer than two values; None values, a
    metric a run could not measure, are left out and ``n`` counts the rest)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    out: dict = {
        "n": int(x.size),
        "mean": float(x.mean()) if x.size else None,
        "sd": None,
        "half_width": None,
        "low": None,
        "high": None,
        "level": level,
    }
    if x.size >= 2:
        sd = float(x.std(ddof=1))
        hw = t_quantile(0.5 + level / 2, x.size - 1) * sd / math.sqrt(x.size)
        out.update(sd=sd, half_width=hw, low=out["mean"] - hw, high=out["mean"] + hw)
    return out


def format_table(results: dict) -> str:
    seeds = results.get("lensnet_seeds", {})
    multi = len(seeds.get("seeds", [])) > 1
    rows = ["policy        NLL (± sd over docs)   NGR     budget use  swaps/step  ms/step"]
    for name, r in results["policies"].items():
        ngr = "   -  " if r["ngr"] is None else f"{r['ngr']:6.3f}"
        if name == "lensnet" and multi:  # mean ± t half-width over the training seeds
            s = seeds["summary"]
            ngr = (
                "   -  "
                if s["ngr"]["mean"] is None
                else f"{s['ngr']['mean']:6.3f} ± {s['ngr']['half_width']:.3f}"
            )
            rows.append(
                f"{'lensnet *':<12} {s['nll']['mean']:8.4f} ± {s['nll']['half_width']:.4f}     "
                f"{ngr}"
            )
            continue
        rows.append(
            f"{name:<12} {r['nll']:8.4f} ± {r['nll_std_over_docs']:.4f}     {ngr}   "
            f"{r['budget_use']:8.3f}   {r['swap_rate']:8.3f}   {r['ms_per_step']:7.2f}"
        )
    m = results["lensnet_metrics"]
    fmt = lambda v: "None" if v is None else f"{v:.4f}"  # noqa: E731
    if multi:
        s = seeds["summary"]

        def pm(k: str) -> str:
            if s[k]["mean"] is None:
                return "None"
            hw = s[k]["half_width"]
            return f"{s[k]['mean']:.4f}" + ("" if hw is None else f" ± {hw:.4f}")

        rows.append(
            f"* mean ± 95% t-interval half-width over {len(seeds['seeds'])} training seeds "
            f"{seeds['seeds']}"
        )
        rows.append(
            f"LensNet held-out: ranking accuracy {pm('ranking_accuracy')}, pearson "
            f"{pm('pearson')}, "
            f"legality compliance {fmt(m['legality_compliance'])} (raw "
            f"{fmt(m['legality_compliance_raw'])}, first seed)"
        )
    else:
        rows.append(
            f"LensNet held-out: ranking accuracy {fmt(m['ranking_accuracy'])}, pearson "
            f"{fmt(m['pearson'])}, "
            f"legality compliance {fmt(m['legality_compliance'])} (raw "
            f"{fmt(m['legality_compliance_raw'])})"
        )
    return "\n".join(rows)


def expansion_room(w: WorldConfig) -> tuple[int, int]:
    """(refocus steps at which one L1 expansion fits W_max beside the coarsest legal cover, all
    refocus steps). With none, no policy can do anything but the recency cover: the study is void.
    """
    b, doc_tokens = w.tree.block_size, w.synthetic.n_blocks * w.tree.block_size
    first = max(w.warmup_tokens, w.step_tokens)
    cursors = range(first, doc_tokens - w.horizon + 1, w.step_tokens)
    fits = sum(
        min_slots(t, b, w.tree.max_level, w.context.tail_tokens) + b - 1 <= w.context.w_max
        for t in cursors
    )
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
    """The module docstring's study: label, train (one LensNet per training seed), evaluate every
    policy at every budget, report."""
    out, t_start = _open_run(args), time.perf_counter()
    timings = {}
    w, lm, make_episode = _world(args)
    budgets, budget_notes = _budgets(args, w)
    for note in budget_notes:
        print(note)
    t0 = time.perf_counter()
    train_dir, heldout_dir = _label(args, w, lm, out)
    timings["label_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    trained = _train_seeds(args, w, train_dir, heldout_dir, make_episode, out, lm, budgets)
    timings["train_s"] = time.perf_counter() - t0
    model, device = trained.lensnets[0].model, trained.device
    cue_metrics = None
    if args.env == "synthetic":  # LensNet's calibrated scores and the exact labels on held-out
        _save_score_distribution(model, trained.heldout, device, out / "scores.npz")
        cue_metrics = _cue_metrics(trained.heldout, w.synthetic)
    t0 = time.perf_counter()
    docs = list(range(HELD_OUT_FIRST_DOC, HELD_OUT_FIRST_DOC + args.eval_docs))
    sweep, seed_sweep = _evaluate_budgets(args, w, budgets, docs, trained, make_episode, out)
    timings["eval_s"] = time.perf_counter() - t0
    first = trained.lensnets[0]
    results = {
        "env": args.env,
        "seed": args.seed,
        "w_max": w.context.w_max,
        "gister": w.gister if args.env == "lm" else "mean (synthetic world)",
        "policies": sweep[str(w.context.w_max)],
        "lensnet_metrics": first.metrics,
        "cue_metrics": cue_metrics,
        "lensnet_params": model.n_params(),
        "lensnet_step": first.step,
        "lensnet_select": args.select,
        "lensnet_calibration": trained.calibrations[0] if trained.calibrations else None,
        "lensnet_calibration_per_seed": trained.calibrations,
        "lensnet_seeds": _seed_summary(trained, seed_sweep, sweep, w.context.w_max),
        "train_snapshots": trained.n_train,
        "val_snapshots": trained.n_val,
        "heldout_snapshots": len(trained.heldout),
        "heldout_docs": [docs[0], docs[-1]],
        "budget_sweep": {
            b: {
                name: {
                    k: r[k] for k in ("nll", "nll_std_over_docs", "ngr", "budget_use", "swap_rate")
                }
                for name, r in pols.items()
            }
            for b, pols in sweep.items()
        },
        "budget_notes": budget_notes,
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    _report(args, out, results)
    return results


def _open_run(args: RunArgs) -> Path:
    """The run folder with the command, the configuration and the versions (a rerun starts its
    training curves afresh)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "command.txt").write_text(" ".join(["python -m sim.run", *sys.argv[1:]]) + "\n")
    (out / "config.json").write_text(json.dumps(to_dict(args), indent=1))
    (out / "versions.json").write_text(json.dumps(versions(), indent=1))
    return out


def _world(args: RunArgs):
    """(the world, the LM as labelling takes it (None: synthetic), an episode factory): with
    --env lm one frozen LM for labelling and evaluation, whose width the tree takes, and the gister
    recorded as the one used."""
    w = replace(args.world, env=args.env)
    if args.env != "lm":

        def make_episode(world, doc, seed):
            return synthetic_episode(world, doc, seed)[0]

        return w, None, make_episode
    import torch

    from sim.taskworld.world import load_reader

    if not args.progress:  # transformers' own weight-loading bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    lm = load_reader(args.lm, w.gister, w.tree.block_size,
                     dtype=None if args.lm_dtype == "auto" else getattr(torch, args.lm_dtype))
    # the tree takes the LM's width; the gister is recorded as what was used
    w = replace(w, tree=replace(w.tree, d_model=lm.oracle.d_model), gister=lm.gister_name)

    def make_lm_episode(world, doc, seed):
        return lm_episode(world, doc, seed, lm.oracle, lm.own_tokenizer, lm.gister)

    return w, (lm.model, lm.own_tokenizer), make_lm_episode


def _label(args: RunArgs, w: WorldConfig, lm, out: Path) -> tuple[Path, Path]:
    """The training and held-out traces (resumable: a rerun with the same config reuses complete
    shards)."""
    common = dict(seed=args.seed, world=w, progress=args.progress, lm=args.lm)
    train_dir = generate_traces(
        TraceArgs(out=str(out / "traces" / "train"), n_docs=args.train_docs, **common), lm=lm
    )
    heldout_dir = generate_traces(
        TraceArgs(
            out=str(out / "traces" / "heldout"),
            n_docs=args.eval_docs,
            first_doc=HELD_OUT_FIRST_DOC,
            **common,
        ),
        lm=lm,
    )
    return train_dir, heldout_dir


@dataclass
class _Trained:
    """One seed's LensNet: training seed, the model (selected weights), its step, its held-out
    metrics."""

    seed: int
    model: object
    step: int
    metrics: dict


@dataclass
class _Training:
    """Every training seed's LensNet on the same traces, with what they share."""

    lensnets: list[_Trained]
    calibrations: list[dict]
    heldout: object
    """The held-out snapshots (a ``TraceDataset``)."""
    device: object
    n_train: int
    n_val: int


def _train_seeds(args: RunArgs, w: WorldConfig, train_dir: Path, heldout_dir: Path,
                 make_episode, out: Path, lm=None, budgets: Sequence[int] = ()) -> _Training:
    """One LensNet per training seed on the same traces and validation documents (the first
    trains into OUT itself), each selected (with ``--dagger-docs``, after its DAgger round),
    calibrated on the validation documents (never the held-out ones) and measured on the held-out
    snapshots."""
    from lensnet.data import TraceDataset
    from lensnet.train import model_config_for, snapshot_metrics, split_indices
    from megacontext.traces import TraceReader

    if args.train_seeds < 1:
        raise ConfigError(f"train_seeds must be >= 1, got {args.train_seeds}")
    if args.calibrate and args.calibration_docs < 1:
        raise ConfigError(f"calibration_docs must be >= 1, got {args.calibration_docs}")
    if args.dagger_docs < 0 or (args.dagger_docs and args.dagger_steps < 1):
        raise ConfigError("dagger_docs must be >= 0, and dagger_steps >= 1 when it is on")
    reader = TraceReader(train_dir, require_complete=True)
    train_idx, val_idx = split_indices(reader.snapshots["doc_id"], 0.1, args.seed)
    heldout = TraceDataset(TraceReader(heldout_dir, require_complete=True))
    mcfg = model_config_for(args.preset, w.tree.d_model, w.tree.max_level, w.tree.block_size)
    lensnets: list[_Trained] = []
    calibrations: list[dict] = []
    n_train, n_val = len(train_idx), len(val_idx)
    for k in range(args.train_seeds):
        train_seed = args.seed + k
        run_dir = out if k == 0 else out / "train-seeds" / f"seed-{train_seed}"
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        first_dir = run_dir / "round-1" if args.dagger_docs else run_dir
        trainer, step, selected = _train_round(
            args, mcfg, train_seed, reader, train_idx, val_idx, first_dir, args.train)
        if args.dagger_docs:
            dagger_dir = _dagger_traces(args, w, trainer.model.eval(), trainer.device,
                                        train_seed, out, lm, budgets or [w.context.w_max])
            both, tr2, va2 = _with_dagger(reader, train_dir, dagger_dir, train_idx, val_idx,
                                          args.seed)
            steps = args.dagger_steps
            cfg = replace(args.train, total_steps=steps, warmup_steps=min(
                args.train.warmup_steps, steps // 10), eval_every=min(args.train.eval_every,
                                                                      steps))
            trainer, step, selected = _train_round(args, mcfg, train_seed, both, tr2, va2,
                                                   run_dir, cfg, init=trainer.model)
            n_train, n_val = len(tr2), len(va2)
        model = trainer.model.eval()
        if args.calibrate:
            calibrations.append(_calibrate_seed(args, w, model, trainer.device, reader, val_idx,
                                                selected, make_episode))
        metrics = snapshot_metrics(model, trainer.loss_fn, heldout, 16, trainer.device)
        lensnets.append(_Trained(train_seed, model, step,
                                 {key.removeprefix("val/"): v for key, v in metrics.items()}))
    return _Training(lensnets, calibrations, heldout, trainer.device, n_train, n_val)


def _train_round(args: RunArgs, mcfg, train_seed: int, reader, train_idx, val_idx,
                 run_dir: Path, train_cfg: TrainConfig, init=None):
    """(trainer with the selected weights loaded, their step, their checkpoint): one training run
    of seed ``train_seed`` into ``run_dir``, from ``init``'s weights when given."""
    from lensnet.data import TraceDataset
    from lensnet.train import Trainer, load_checkpoint

    train_set = TraceDataset(reader, train_idx, augment=train_cfg.augment, seed=train_seed)
    trainer = Trainer(mcfg, replace(train_cfg, seed=train_seed), train_set,
                      TraceDataset(reader, val_idx), run_dir, progress=args.progress)
    if init is not None:
        trainer.model.load_state_dict(init.state_dict())
    trainer.train()
    step, selected = trainer.step, run_dir / "latest.pt"  # latest.pt: written at the last step
    if args.select == "best" and math.isfinite(trainer.best):  # best.pt is this run's
        selected = run_dir / "best.pt"
        ckpt = load_checkpoint(selected, trainer.device)
        trainer.model.load_state_dict(ckpt["model"])
        step = int(ckpt["step"])
    return trainer, step, selected


def _dagger_traces(args: RunArgs, w: WorldConfig, model, device, train_seed: int, out: Path,
                   lm, budgets: Sequence[int]) -> Path:
    """OUT/traces/dagger-seed-S: ``dagger_docs`` new training documents labelled along
    ``model``'s own focus (raw scores + noise), one part per budget (resumable like every trace).
    """
    import torch

    behaviour = LensNetPolicy(model, device, name=f"lensnet seed {train_seed} (DAgger)")
    path = out / "traces" / f"dagger-seed-{train_seed}"
    with torch.no_grad():
        for i, b in enumerate(budgets):
            wb = replace(w, context=replace(w.context, w_max=b))
            generate_traces(
                TraceArgs(out=str(path), n_docs=args.dagger_docs, first_doc=args.train_docs,
                          seed=args.seed, shard=f"{i}/{len(budgets)}", world=wb,
                          behaviour_scale=args.dagger_noise, progress=args.progress, lm=args.lm),
                lm=lm, behaviour=behaviour)
    return path


def _with_dagger(reader, train_dir: Path, dagger_dir: Path, train_idx, val_idx, seed: int):
    """(both traces as one reader, its training indices, its validation indices): the first
    round's split unchanged, the DAgger documents split by document as it was."""
    from lensnet.train import split_indices
    from megacontext.traces import TraceReader

    dagger = TraceReader(dagger_dir, require_complete=True)
    both = TraceReader([train_dir, dagger_dir], require_complete=True)
    d_train, d_val = split_indices(dagger.snapshots["doc_id"], 0.1, seed)
    n = len(reader)
    return both, np.concatenate([train_idx, n + d_train]), np.concatenate([val_idx, n + d_val])


def _calibrate_seed(args: RunArgs, w: WorldConfig, model, device, reader, val_idx,
                    selected: Path, make_episode) -> dict:
    """The score scale fitted on the validation documents' episodes (never the held-out ones),
    set on ``model`` and stored in its checkpoint ``selected``."""
    import torch

    from lensnet.train import save_calibration

    t_cal = time.perf_counter()
    val_docs = sorted({int(d) for d in reader.snapshots["doc_id"][val_idx]})[
        : args.calibration_docs
    ]
    with torch.no_grad():
        calibration = fit_score_scale(
            lambda s, m=model, dev=device: LensNetPolicy(m, dev, scale=s),
            w,
            val_docs,
            args.seed,
            episode_factory=make_episode,
        )
    model.score_scale = calibration["score_scale"]
    calibration["seconds"] = time.perf_counter() - t_cal
    save_calibration(selected, calibration)  # the evaluated weights carry their scale
    return calibration


def _evaluate_budgets(args: RunArgs, w: WorldConfig, budgets: list[int], docs: list[int],
                      trained: _Training, make_episode, out: Path):
    """(budget -> policy -> record, per training seed: budget -> LensNet's record): every policy on
    the held-out documents at the run's W_max, then the other budgets of the sweep (the baselines
    shared by the seeds); ``OUT/focus.jsonl`` logs one document's focus at the run's W_max."""
    import torch

    model, device = trained.lensnets[0].model, trained.device
    focus_log = (out / "focus.jsonl").open("w")
    refs = _referenced_blocks(w, docs[0], args.seed) if args.env == "synthetic" else None

    def log_step(name, ep, actions):
        if ep.doc_id == docs[0]:  # one document's focus trajectory per policy, for the heat map
            rec = {
                "policy": name,
                "T": ep.wc.n_tokens,
                "levels": ep.wc.levels.tolist(),
                "starts": ep.wc.starts.tolist(),
            }
            if refs is not None:  # the blocks the next H tokens refer to (what focus should serve)
                rec["referenced"], rec["block_size"] = refs(ep.wc.n_tokens), ep.wc.block_size
            focus_log.write(json.dumps(rec) + "\n")

    sweep: dict[str, dict] = {}
    seed_sweep: list[dict[str, dict]] = [{} for _ in trained.lensnets]
    with torch.no_grad():  # a context, so an error leaves the caller's grad mode as it was
        for budget in tqdm(budgets, desc="budgets", disable=not args.progress or len(budgets) == 1):
            wb = replace(w, context=replace(w.context, w_max=budget))
            ctx = PolicyContext(seed=args.seed, lensnet=model, device=str(device))
            names = ["recency", "all_coarse", "random", "oracle", "lensnet"]
            names += ["cue"] if args.env == "synthetic" else []
            policies = [build_policy(name, ctx, "stream") for name in names]
            if args.calibrate:
                policies.append(LensNetPolicy(model, device, scale=1.0, name="lensnet_raw"))
            per_policy = {
                p.name: evaluate_policy(
                    p,
                    wb,
                    docs,
                    args.seed,
                    args.progress,
                    episode_factory=make_episode,
                    on_step=log_step if budget == w.context.w_max else None,
                )
                for p in policies
            }
            ngr = nll_gap_recovered(per_policy)
            for name, r in per_policy.items():
                r["ngr"] = ngr[name]
            order = ("lensnet", "lensnet_raw", "cue", "recency", "random", "all_coarse", "oracle")
            sweep[str(budget)] = {k: per_policy[k] for k in order if k in per_policy}
            seed_sweep[0][str(budget)] = per_policy["lensnet"]
            for k, extra in enumerate(trained.lensnets[1:], start=1):  # the baselines are shared
                r = evaluate_policy(
                    LensNetPolicy(extra.model, device),
                    wb,
                    docs,
                    args.seed,
                    args.progress,
                    episode_factory=make_episode,
                )
                r["ngr"] = nll_gap_recovered(
                    {"recency": per_policy["recency"], "oracle": per_policy["oracle"], "lensnet": r}
                )["lensnet"]
                seed_sweep[k][str(budget)] = r
    focus_log.close()
    return sweep, seed_sweep


def _seed_summary(trained: _Training, seed_sweep: list[dict], sweep: dict, w_max: int) -> dict:
    """Each training seed's LensNet at the run's W_max and across the budgets, and the mean with
    its 95 % Student-t interval over the seeds."""
    at = str(w_max)
    per_seed = [
        {
            "seed": t.seed,
            "step": t.step,
            "nll": seed_sweep[k][at]["nll"],
            "ngr": seed_sweep[k][at]["ngr"],
            "expands_per_step": seed_sweep[k][at]["expands_per_step"],
            "score_scale": trained.calibrations[k]["score_scale"] if trained.calibrations else 1.0,
            **{
                key: t.metrics[key]
                for key in (
                    "ranking_accuracy",
                    "pearson",
                    "legality_compliance",
                    "mse",
                    "precision_at_n_diff",
                )
            },
            "budget_sweep": {
                b: {"nll": r["nll"], "ngr": r["ngr"]} for b, r in seed_sweep[k].items()
            },
        }
        for k, t in enumerate(trained.lensnets)
    ]
    return {
        "seeds": [r["seed"] for r in per_seed],
        "per_seed": per_seed,
        "summary": {
            key: t_interval([r[key] for r in per_seed])
            for key in (
                "nll",
                "ngr",
                "ranking_accuracy",
                "pearson",
                "precision_at_n_diff",
                "expands_per_step",
            )
        },
        "budget_sweep_summary": {
            b: {
                key: t_interval([r["budget_sweep"][b][key] for r in per_seed])
                for key in ("nll", "ngr")
            }
            for b in sweep
        },
    }


def _report(args: RunArgs, out: Path, results: dict) -> None:
    """results.json, the plots, the table."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.plots:
        from analysis.plots import draw_all

        draw_all(out)
    print(format_table(results))
    print(
        f"\nrun directory: {out}  (results.json, metrics.jsonl, "
        f"checkpoints{', plots/' if args.plots else ''})"
    )


def _save_score_distribution(model, dataset, device, path: Path) -> None:
    """LensNet's calibrated (masked) scores and the exact labels of every labelled held-out entry,
    with its kind (can expand / can collapse): what ``analysis.plots`` draws against the thresholds.
    """
    import torch

    from lensnet.data import collate, to_device

    parts: dict[str, list[np.ndarray]] = {
        "score": [],
        "label": [],
        "can_expand": [],
        "can_collapse": [],
    }
    with torch.no_grad():
        for s in range(0, len(dataset), 32):
            batch = to_device(
                collate([dataset[i] for i in range(s, min(s + 32, len(dataset)))]), device
            )
            keep = (batch["action_mask"] & batch["valid_mask"]).cpu().numpy()
            parts["score"].append(model.score(batch).cpu().numpy()[keep])
            parts["label"].append(batch["target_utilities"].cpu().numpy()[keep])
            parts["can_expand"].append((batch["expand_cost"] > 0).cpu().numpy()[keep])
            parts["can_collapse"].append((batch["collapse_refund"] > 0).cpu().numpy()[keep])
    np.savez_compressed(
        path, score_scale=model.score_scale, **{k: np.concatenate(v) for k, v in parts.items()}
    )


def _cue_metrics(dataset, synthetic: SyntheticConfig) -> dict:
    """LensNet's metrics (ranking, Pearson, precision@n_diff, ...) of the ``cue`` reference's scores
    on the same labelled held-out snapshots: the ceiling of those metrics from LensNet's inputs."""
    import torch

    from lensnet.metrics import MetricAccumulator
    from megacontext.working_context import ContextArrays
    from sim.streamworld.synthetic import cue_scores

    acc = MetricAccumulator()
    fields = ContextArrays.__dataclass_fields__
    for i in range(len(dataset.indices)):
        snap = dataset.reader[int(dataset.indices[i])]
        arr = ContextArrays(**{k: snap[k] for k in fields if k in snap})
        batch = {
            k: torch.as_tensor(np.asarray(snap[k]))[None]
            for k in ("target_utilities", "action_mask", "expand_cost", "collapse_refund")
        }
        batch["valid_mask"] = torch.ones_like(batch["action_mask"], dtype=torch.bool)
        acc.update(torch.as_tensor(cue_scores(arr, synthetic))[None], batch)
    return acc.compute()


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
    run_cli(RunArgs, run, argv, (ConfigError, BudgetExhausted),
            defaults=lm_defaults() if env == "lm" else None)


if __name__ == "__main__":
    main()
