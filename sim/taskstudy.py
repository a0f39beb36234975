"""``python -m sim.taskstudy``: the real-LM task study end to end (DESIGN §9) — generate tasks,
label
question-time counterfactual traces, train LensNet on them, evaluate every policy on held-out tasks.

1. tasks: ``--train-tasks`` from the training filler and phrasing, ``--eval-tasks`` from the
held-out
   ones (``sim.tasks``), written to ``OUT/tasks-{train,heldout}.jsonl``;
2. label (``label_tasks``): each training task streams to question time; for each of the zoom
   rounds, every legal action is labelled with the frozen LM (horizon = the answer tokens, the
   two-level lookahead for L2 gists), the snapshot written to ``OUT/traces`` (resumable, sharded
   with ``--shard i/n``: run ``n`` processes, then ``--label-only false`` once to train on all
   parts), and the oracle's own scores move the focus to the next round;
3. train: LensNet on those snapshots, checkpoint choice on a validation split by task;
4. evaluate: ``sim.evaluate`` on the held-out tasks with the trained LensNet and the baselines.

Uses CUDA when present. ``--ship`` copies the trained LensNet and its card into
``lensnet/checkpoints`` (the default ``sim.evaluate`` loads).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from lensnet.data import AugmentConfig
from lensnet.train import TrainConfig
from megacontext.cli import run_cli, to_argv, to_dict
from megacontext.labels import label_snapshot
from megacontext.traces import TraceWriter, parse_shard
from megacontext.tree import ConfigError
from sim.policies import GreedyOracle
from sim.tasks import TASK_KINDS, TaskConfig, generate_tasks, read_tasks, token_counter, write_jsonl
from sim.taskworld.world import TaskError, TaskWorldConfig, prepare_task, zoom


def _default_train() -> TrainConfig:
    return TrainConfig(
        lr=1e-3,
        warmup_steps=50,
        total_steps=600,
        eval_every=100,
        ckpt_every=300,
        batch_size=16,
        augment=AugmentConfig(jitter_p=0.0),
    )


@dataclass
class TaskStudyArgs:
    """Real-LM task study: tasks -> question-time labels -> LensNet -> held-out evaluation."""

    task: str = field(default="passkey", metadata={"choices": lambda: tuple(TASK_KINDS)})
    """Task kind, one of sim.tasks.TASK_KINDS (passkey, multikey, vt, code); 'code' = module
    continuation (answer NLL and NGR; depths do not apply)."""
    out: str = "runs/tasks"
    """Run directory."""
    seed: int = 0
    """The one seed: tasks, LensNet init and data order derive from it."""
    train_tasks: int = 48
    """Training tasks to label."""
    eval_tasks: int = 12
    """Held-out tasks (held-out filler and phrasing)."""
    train_lengths: tuple[int, ...] = (1024, 2048)
    """Token lengths of the training tasks (cycled)."""
    eval_lengths: tuple[int, ...] = (2048, 4096)
    """Token lengths of the held-out tasks (cycled)."""
    eval_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    """Needle depths of the held-out tasks (cycled; the depth x length grid)."""
    policies: str = "lensnet,recency,sinks,random,retrieval,surprisal,oracle,full"
    """Policies of the held-out evaluation (sim.evaluate --policies)."""
    lm: str = "smollm2"
    """'smollm2', 'tiny' (random-init test LM) or a local model folder."""
    shard: str = "0/1"
    """i/n: this process labels the training tasks with index % n == i (into
    OUT/traces/part-i-of-n)."""
    stream_every: int = 0
    """Also label ordinary stream steps, every this many steps (0 = question time only: labels cost
    about a minute per snapshot of a 2k-token task on a 2-core CPU)."""
    horizon: int = 32
    """H of the stream-step labels (next H stream tokens)."""
    label_only: bool = False
    """Stop after labelling (sharded runs: then rerun with --shard 0/1 to train on every part)."""
    preset: Literal["tiny", "small", "seed"] = "small"
    """LensNet size."""
    ship: bool = False
    """Copy the trained LensNet and its card into lensnet/checkpoints (the sim.evaluate default)."""
    progress: bool = True
    """Progress bars."""
    world: TaskWorldConfig = field(default_factory=TaskWorldConfig)
    train: TrainConfig = field(default_factory=_default_train)


def label_tasks(
    tasks: list[dict],
    out: Path,
    oracle,
    tokenizer,
    world: TaskWorldConfig,
    gister,
    meta: dict,
    shard: str = "0/1",
    progress: bool = True,
    stream_every: int = 0,
    horizon: int = 32,
) -> Path:
    """Question-time traces: per task and zoom round, every legal action labelled (answer horizon);
    the oracle's scores move the focus between rounds. With ``stream_every`` > 0, also ordinary
    stream steps (every that many steps; horizon = the next ``horizon`` stream tokens). Resumes
    after the last complete shard file."""
    i, n = parse_shard(shard)
    part = out if n == 1 else out / f"part-{i}-of-{n}"
    writer = TraceWriter(part, meta, shard_size=8)
    skip, seen = writer.n_done, 0
    for doc_id, task in enumerate(tqdm(tasks, desc=f"label {part.name}", disable=not progress)):
        if doc_id % n != i:
            continue
        try:
            pt = prepare_task(
                task, oracle, tokenizer, world, gister, features=False, stream_every=stream_every
            )
        except TaskError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        for snap in pt.stream_snapshots:  # stream steps: the next H tokens of the stream
            t = snap.n_tokens
            if seen >= skip:
                writer.add(
                    label_snapshot(
                        snap,
                        oracle,
                        pt.ids[t : t + horizon],
                        t,
                        world.n_tail_gists,
                        doc_id,
                        world.lookahead,
                    )
                )
            seen += 1
        # question time: the oracle's own zoom (its rounds stop at the first that changes nothing),
        # keeping each round's labelled snapshot
        rounds = GreedyOracle(doc_id, keep=True)
        zoom(rounds, pt, world, oracle)
        for labels in rounds.snapshots:
            if seen >= skip:
                writer.add(labels)
            seen += 1
    writer.close()
    return part


def run(args: TaskStudyArgs) -> dict:
    """The study of ``args``: draw the tasks, label, train, evaluate on the held-out tasks, report.
    Gradients are off while labelling and on while training, each inside a context, so the
    caller's grad mode is the same after the run however it ends (``--label-only``, an error)."""
    from sim.taskworld.world import load_reader

    if args.task not in TASK_KINDS:
        raise ConfigError(f"--task must be one of {', '.join(TASK_KINDS)}, got {args.task!r}")
    out = _open_run(args)
    timings: dict[str, float] = {}
    lm = load_reader(args.lm, "auto", args.world.block_size)
    files = _draw_tasks(args, lm, out)
    t0 = time.perf_counter()
    trace_dir = _label(args, lm, files, out)
    timings["label_s"] = time.perf_counter() - t0
    if args.label_only:
        return {"timings": timings}
    t0 = time.perf_counter()
    card = _train(args, lm, trace_dir, files, out)
    timings["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = _evaluate_heldout(args, files, out)
    timings["eval_s"] = time.perf_counter() - t0
    card["heldout"] = {
        name: {k: r[k] for k in ("exact_match", "answer_nll", "focus_recall", "n")}
        for name, r in results["policies"].items()
    }
    (out / "lensnet.json").write_text(json.dumps(card, indent=1))
    if args.ship:
        from sim.shipped import ship

        ship(out / "lensnet.pt", card)
    summary = {"timings": timings, "card": card, "results": results["policies"]}
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    return summary


def _open_run(args: TaskStudyArgs) -> Path:
    """The run folder with the command, the configuration and the versions."""
    from megacontext.cli import versions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(
        " ".join(["python -m sim.taskstudy", *map(shlex.quote, to_argv(args))]) + "\n"
    )
    (out / "config.json").write_text(json.dumps(to_dict(args), indent=1))
    (out / "versions.json").write_text(json.dumps(versions(), indent=1))
    return out


def _draw_tasks(args: TaskStudyArgs, lm, out: Path) -> dict[str, Path]:
    """``OUT/tasks-train.jsonl`` and ``OUT/tasks-heldout.jsonl``, lengths counted in the LM's own
    tokens (a character a token for an LM without a tokenizer)."""
    counter = token_counter(lm.own_tokenizer) if lm.own_tokenizer is not None else len
    files = {}
    for split, n, lengths, depths in (
        ("train", args.train_tasks, args.train_lengths, ()),
        ("heldout", args.eval_tasks, args.eval_lengths, args.eval_depths),
    ):
        files[split] = out / f"tasks-{split}.jsonl"
        cfg = TaskConfig(
            kind=args.task, n_tasks=n, length=lengths, depths=depths, split=split, seed=args.seed
        )
        write_jsonl(generate_tasks(cfg, counter), files[split])
    return files


def _label(args: TaskStudyArgs, lm, files: dict[str, Path], out: Path) -> Path:
    """The training tasks' question-time (and stream) traces, ``OUT/traces`` (``label_tasks``)."""
    import torch

    meta = {
        "d_model": lm.oracle.d_model,
        "n_tail": args.world.n_tail_gists,
        "block_size": args.world.block_size,
        "max_level": args.world.max_level,
        "world": to_dict(args.world),
        "seed": args.seed,
        "oracle": {
            "kind": "lm",
            "lm": args.lm,
            "gister": lm.gister_name,
            "horizon": "answer tokens",
            "lookahead": args.world.lookahead,
        },
        "tasks": str(files["train"]),
        "shard": args.shard,
        "stream_every": args.stream_every,
        "horizon": args.horizon,
    }
    trace_dir = out / "traces"
    with torch.no_grad():
        label_tasks(
            read_tasks(files["train"]),
            trace_dir,
            lm.oracle,
            lm.tokenizer,
            args.world,
            lm.gister,
            meta,
            args.shard,
            args.progress,
            args.stream_every,
            args.horizon,
        )
    return trace_dir


def _train(args: TaskStudyArgs, lm, trace_dir: Path, files: dict[str, Path], out: Path) -> dict:
    """LensNet on the traces (validation split by task: a task's rounds are near-duplicates), the
    selected weights in ``OUT/lensnet.pt``; returns its card (``OUT/lensnet.json``)."""
    import torch

    from lensnet.data import TraceDataset
    from lensnet.train import (
        Trainer,
        load_checkpoint,
        model_config_for,
        snapshot_metrics,
        split_indices,
    )
    from megacontext.cli import versions
    from megacontext.traces import TraceReader
    from sim.shipped import lm_fingerprint

    reader = TraceReader(trace_dir, require_complete=True)
    train_idx, val_idx = split_indices(reader.snapshots["doc_id"], 0.15, args.seed)
    mcfg = model_config_for(
        args.preset, lm.oracle.d_model, args.world.max_level, args.world.block_size
    )
    trainer = Trainer(
        mcfg,
        replace(args.train, seed=args.seed),
        TraceDataset(reader, train_idx, augment=args.train.augment, seed=args.seed),
        TraceDataset(reader, val_idx),
        out,
        progress=args.progress,
    )
    with torch.enable_grad():
        trainer.train()
    best = out / "best.pt" if (out / "best.pt").exists() else out / "final.pt"
    if not best.exists():
        trainer.save("final")
        best = out / "final.pt"
    ckpt = load_checkpoint(best, trainer.device)
    trainer.model.load_state_dict(ckpt["model"])
    val = {
        k.removeprefix("val/"): v
        for k, v in snapshot_metrics(
            trainer.model.eval(), trainer.loss_fn, TraceDataset(reader, val_idx), 16, trainer.device
        ).items()
    }
    card = {
        "task": args.task,
        "command": (out / "command.txt").read_text().strip(),
        "seed": args.seed,
        "step": int(ckpt["step"]),
        "lm": args.lm,
        "lm_fingerprint": lm_fingerprint(lm.model),
        "gister": lm.gister_name,
        "train_tasks": str(files["train"]),
        "train_snapshots": int(len(train_idx)),
        "validation_snapshots": int(len(val_idx)),
        "validation": val,
        "world": to_dict(args.world),
        "python": versions()["python"],
    }
    (out / "lensnet.json").write_text(json.dumps(card, indent=1))
    torch.save(
        {k: ckpt[k] for k in ("model", "model_config", "step")}, out / "lensnet.pt"
    )  # weights only
    return card


def _evaluate_heldout(args: TaskStudyArgs, files: dict[str, Path], out: Path) -> dict:
    """``sim.evaluate`` of the policies on the held-out tasks, into ``OUT/heldout``."""
    from sim.evaluate import EvaluateArgs, evaluate_tasks

    ev = EvaluateArgs(
        tasks=str(files["heldout"]),
        out=str(out / "heldout"),
        policies=args.policies,
        lm=args.lm,
        lensnet=str(out / "lensnet.pt"),
        seed=args.seed,
        progress=args.progress,
        world=args.world,
    )
    return evaluate_tasks(ev)


def main(argv: list[str] | None = None) -> None:
    run_cli(TaskStudyArgs, run, argv)  # ConfigError, TaskError: ValueErrors


if __name__ == "__main__":
    main()
