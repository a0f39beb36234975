"""``python -m sim.tasktrain``: the task-world LensNet across every task kind (issue 18, items 3-4).

1. train on cheap-label traces (``python -m sim.tasklabels``: attention labels, train split, every
   kind, 2k and 4k streams) with the attention features and the question tokens as inputs;
2. select the checkpoint on *exact*-label validation traces (``sim.tasklabels --labels exact`` on
   disjoint train-split tasks) by ranking accuracy (the two label sources are on different scales,
   so the validation loss would measure the scale, not the order);
3. calibrate (``sim.calibrate.fit_task_calibration``): the gate (its scores x a scale, or its
   order on the rank scale) and the score scale with the lowest mean answer NLL after the zoom on
   calibration tasks (train split, disjoint from the training and validation tasks, at the lengths
   the LensNet is used at), stored in the checkpoint;
4. write ``OUT/lensnet.pt`` (weights + calibration) and its card ``OUT/lensnet.json``; ``--ship``
   copies both to ``lensnet/checkpoints`` as the task-world default (``--lensnet auto`` for any task
   file: the JSONL contract has no kind field).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from lensnet.data import AugmentConfig
from lensnet.train import TrainConfig
from megacontext.cli import from_dict, run_cli, to_argv, to_dict
from megacontext.tree import ConfigError


def _default_train() -> TrainConfig:
    return TrainConfig(
        lr=1e-3,
        warmup_steps=100,
        total_steps=1500,
        eval_every=100,
        ckpt_every=1500,
        batch_size=16,
        select="ranking_accuracy",
        # no target noise: the seed's 0.05-nat noise would swamp attention-mass labels (~0.01-0.3)
        augment=AugmentConfig(jitter_p=0.0, noise_p=0.0),
    )


@dataclass
class TaskTrainArgs:
    """Train, select, calibrate (and ship) the cross-kind task-world LensNet."""

    traces: str = "runs/task-traces/train"
    """Cheap-label training traces (sim.tasklabels)."""
    val_traces: str = "runs/task-traces/val-exact"
    """Exact-label validation traces (sim.tasklabels --labels exact), on disjoint tasks."""
    out: str = "runs/task-lensnet"
    """Run directory."""
    preset: Literal["tiny", "small", "seed"] = "small"
    """LensNet size."""
    features: bool = True
    """Read the attention features (off: the ablation without them)."""
    query: bool = True
    """Read the question's tokens as tail latents (off: the ablation with the tail gists only)."""
    prior: bool = True
    """With traces of the 'prior-lexical' feature set: start from the BM25 baseline's scores and
    learn what to add (``LensNetConfig.prior``), calibrated on the scale gate only, so the model
    may decline to zoom; off: the ablation that reads that column as one more feature."""
    calibrate: bool = True
    """Fit the gate and score scale on calibration tasks (else: the scale gate, scale 1)."""
    cal_tasks: str | None = None
    """A JSONL file of calibration tasks (instead of the generated ones below); required when the
    training traces were labelled from a task file (the generated ones would be other tasks)."""
    cal_first_task: int = 2000
    """First index of the calibration tasks: train-split tasks of the training traces' kinds,
    disjoint from the training and validation tasks."""
    cal_n_tasks: int = 6
    """Calibration tasks per kind."""
    cal_length: tuple[int, ...] = (2048, 2048, 4096)
    """Their lengths in tokens (task i takes length[i % len]): the lengths it is used at."""
    lm: str = "smollm2"
    """'smollm2', 'tiny' (random-init test LM) or a local model folder."""
    ship: bool = False
    """Copy the LensNet and its card into lensnet/checkpoints (the sim.evaluate default)."""
    progress: bool = True
    """Progress bars."""
    train: TrainConfig = field(default_factory=_default_train)


def run(args: TaskTrainArgs) -> dict:
    """Train, select, calibrate, write the card (and ship): the module docstring's steps."""
    out = _open_run(args)
    traces = _read_traces(args)
    mcfg = _model_config(args, traces)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    trainer, ckpt, val = _train_and_select(args, traces, mcfg, out)
    timings["train_s"] = time.perf_counter() - t0
    calibration: dict = {"score_scale": 1.0, "fitted": False}
    if args.calibrate:
        from sim.taskworld.world import load_reader

        lm = load_reader(args.lm, traces.meta["oracle"].get("gister", "auto"),
                         traces.world.block_size)
        t0 = time.perf_counter()  # the calibration alone, as before: the LM is loaded
        calibration = _calibrate(args, traces, mcfg, out, trainer.device, lm)
        timings["calibrate_s"] = time.perf_counter() - t0
        model = lm.model
    else:
        from megacontext.lm import load_lm

        model = load_lm(args.lm)[0]  # its fingerprint goes on the card
    card = _card(args, traces, mcfg, out, ckpt, val, model, calibration, timings)
    _write_card(args, out, card)
    return card


@dataclass
class _Traces:
    """The training and validation traces, checked to hold the same inputs."""

    reader: object
    val_reader: object
    world: object

    @property
    def meta(self) -> dict:
        return self.reader.meta

    @property
    def vmeta(self) -> dict:
        return self.val_reader.meta


def _open_run(args: TaskTrainArgs) -> Path:
    """The run folder with its command.txt (calibration tasks from the sealed split refused)."""
    from sim.tasks.jsonl import refuse_sealed

    if args.cal_tasks:  # calibration is selection: never on the sealed test split
        refuse_sealed(args.cal_tasks, "sim.tasktrain")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(
        " ".join(["python -m sim.tasktrain", *map(shlex.quote, to_argv(args))]) + "\n"
    )
    return out


def _read_traces(args: TaskTrainArgs) -> _Traces:
    """Both trace folders, refused when they differ in their inputs, come from a sealed file, or
    cannot be calibrated on generated tasks."""
    from megacontext.traces import TraceReader
    from sim.tasks.jsonl import refuse_sealed
    from sim.taskworld.world import TaskWorldConfig

    reader = TraceReader(args.traces, require_complete=True)
    val_reader = TraceReader(args.val_traces, require_complete=True)
    meta, vmeta = reader.meta, val_reader.meta
    for m in (meta, vmeta):  # traces labelled from a task file: that file (never a sealed one)
        if isinstance(m.get("tasks"), str):
            refuse_sealed(m["tasks"], "sim.tasktrain")
    for key in ("n_query_tokens", "n_entry_features", "feature_set", "n_tail", "d_model",
                "world"):
        if meta.get(key) != vmeta.get(key):
            raise ConfigError(
                f"{args.traces} and {args.val_traces} differ in {key!r}: "
                f"{meta.get(key)!r} vs {vmeta.get(key)!r}"
            )
    if args.calibrate and isinstance(meta["tasks"], str) and not args.cal_tasks:
        raise ConfigError(
            f"{args.traces}: labelled from the task file {meta['tasks']}, so calibration cannot "
            f"generate tasks like them: pass --cal-tasks FILE.jsonl (tasks disjoint from the "
            f"training and validation ones), or --no-calibrate"
        )
    return _Traces(reader, val_reader, from_dict(TaskWorldConfig, meta["world"]))


def _model_config(args: TaskTrainArgs, traces: _Traces):
    """LensNet's configuration for these traces: the preset, their inputs (less what the ablation
    flags switch off), their feature set and, for 'prior-lexical' traces, the BM25 prior."""
    from lensnet.train import model_config_for
    from sim.tasklabels import trace_feature_set

    world, meta = traces.world, traces.meta
    mcfg = model_config_for(
        args.preset,
        traces.reader.d_model,
        world.max_level,
        world.block_size,
        traces.reader.n_entry_features if args.features else 0,
        int(meta["n_query_tokens"]) if args.query else 0,
    )
    if mcfg.n_entry_features:  # the manifest must say which features it holds: never guess
        mcfg = replace(mcfg, feature_set=trace_feature_set(meta, args.traces))
        if mcfg.feature_set == "prior-lexical" and args.prior:
            mcfg = replace(mcfg, prior="bm25")
    return mcfg


def _train_and_select(args: TaskTrainArgs, traces: _Traces, mcfg, out: Path):
    """(trainer holding the selected weights, that checkpoint, its validation metrics); writes
    ``OUT/lensnet.pt`` (weights, configuration, step)."""
    import torch

    from lensnet.data import TraceDataset
    from lensnet.train import Trainer, load_checkpoint, snapshot_metrics

    inputs = {
        "tail_rows": None if args.query else int(traces.meta["n_tail_gists"]),
        "entry_features": args.features,
    }
    train_ds = TraceDataset(traces.reader, augment=args.train.augment, seed=args.train.seed,
                            **inputs)
    val_ds = TraceDataset(traces.val_reader, **inputs)
    trainer = Trainer(mcfg, args.train, train_ds, val_ds, out, progress=args.progress)
    with torch.enable_grad():
        trainer.train()
    best = out / "best.pt" if (out / "best.pt").exists() else trainer.save("final.pt")
    ckpt = load_checkpoint(best, trainer.device)
    trainer.model.load_state_dict(ckpt["model"])
    val = {
        k.removeprefix("val/"): v
        for k, v in snapshot_metrics(
            trainer.model.eval(), trainer.loss_fn, val_ds, 16, trainer.device
        ).items()
    }
    torch.save({k: ckpt[k] for k in ("model", "model_config", "step")}, out / "lensnet.pt")
    return trainer, ckpt, val


def _calibrate(args: TaskTrainArgs, traces: _Traces, mcfg, out: Path, device, lm) -> dict:
    """The gate and score scale fitted on calibration tasks read by ``lm`` (a
    ``sim.taskworld.world.Reader``; ``sim.calibrate.fit_task_calibration``), stored in
    ``OUT/lensnet.pt``."""
    import torch

    from lensnet.train import load_model, save_calibration
    from sim.calibrate import fit_task_calibration
    from sim.policies import LensNetPolicy, LensNetRank
    from sim.tasklabels import TaskLabelArgs, _tasks
    from sim.taskworld.world import TaskError, check_query_fits, prepare_task

    meta, world = traces.meta, traces.world
    # the training traces' kinds and seed, a disjoint task range (or a given task file)
    vargs = TaskLabelArgs.from_meta(meta, first_task=args.cal_first_task,
                                    n_tasks=args.cal_n_tasks, length=args.cal_length,
                                    tasks=args.cal_tasks)
    prepared = []
    with torch.no_grad():
        for task in _tasks(vargs, lm.own_tokenizer):
            try:
                pt = prepare_task(task, lm.oracle, lm.tokenizer, world, lm.gister, False,
                                  attention=True)
                if mcfg.n_query_tokens:  # the question whole, or the task is skipped
                    check_query_fits(pt, mcfg.n_query_tokens)
                prepared.append(pt)
            except TaskError as err:
                print(f"validation task skipped: {err}", file=sys.stderr)
        lens = load_model(out / "lensnet.pt", device)
        calibration = fit_task_calibration(
            lambda g: LensNetPolicy(lens, device, scale=g), prepared, world, lm.oracle,
            # a prior LensNet's expand decision is its calibrated threshold, never a rank gate
            rank_policy=None if mcfg.prior else LensNetRank(lens, device),
        )
    calibration["fitted"] = True
    save_calibration(out / "lensnet.pt", calibration)
    return calibration


def _card(args: TaskTrainArgs, traces: _Traces, mcfg, out: Path, ckpt: dict, val: dict, model,
          calibration: dict, timings: dict) -> dict:
    """The checkpoint's card: what it was trained, selected and calibrated on."""
    from megacontext.cli import versions
    from sim.shipped import lm_fingerprint
    from sim.tasklabels import agreement_summary

    meta, vmeta = traces.meta, traces.vmeta
    return {
        "task": "all",
        "kinds": (meta["tasks"] or {}).get("kinds") if isinstance(meta["tasks"], dict) else None,
        "command": (out / "command.txt").read_text().strip(),
        "seed": args.train.seed,
        "step": int(ckpt["step"]),
        "lm": args.lm,
        "lm_fingerprint": lm_fingerprint(model),
        "gister": meta["oracle"].get("gister"),
        "train_traces": {"labels": meta.get("labels"), "tasks": meta.get("tasks"),
                         "covers": meta.get("covers"), "snapshots": len(traces.reader)},
        "validation_traces": {"labels": vmeta.get("labels"), "tasks": vmeta.get("tasks"),
                              "covers": vmeta.get("covers"), "snapshots": len(traces.val_reader)},
        "validation": val,
        "labels_agreement": agreement_summary(args.val_traces, args.traces),
        "calibration": calibration,
        "inputs": {"n_query_tokens": mcfg.n_query_tokens,
                   "n_entry_features": mcfg.n_entry_features,
                   "feature_set": mcfg.feature_set if mcfg.n_entry_features else None,
                   "prior": mcfg.prior or None},
        "world": to_dict(traces.world),
        "timings": timings,
        "python": versions()["python"],
    }


def _write_card(args: TaskTrainArgs, out: Path, card: dict) -> None:
    """``OUT/lensnet.json``; with --ship the checkpoint and its card into lensnet/checkpoints."""
    from sim.shipped import ship

    (out / "lensnet.json").write_text(json.dumps(card, indent=1) + "\n")
    if args.ship:
        ship(out / "lensnet.pt", card)


def main(argv: list[str] | None = None) -> None:
    _, card = run_cli(TaskTrainArgs, run, argv)
    print(json.dumps({k: card[k] for k in ("step", "validation", "calibration")}, indent=1))


if __name__ == "__main__":
    main()
