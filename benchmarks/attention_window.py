"""Choose the ``attention`` baseline's layer window per read mode on *training* tasks only (DESIGN
§10, §11).

    python -m benchmarks.attention_window --out results/attention-window-faithful

Generates training tasks of the needle kinds (``sim.tasks``, train split and phrasings: no dev or
test file is read), streams each to question time at the world's budget, and reads the question's
attention over the stream's keys in both read modes: ``faithful`` (the keys as the working context
read them, the question's query from the question-time context) and ``full-read`` (one forward over
the whole stream). Per layer, and per contiguous window of up to ``max_width`` layers (the block
masses averaged over the window's layers and heads, the sink token left out), the needle block's
rank among the context's blocks (those wholly before the question) gives hit@1, hit@3 and the mean
reciprocal rank; the window with the best MRR (ties: the narrower, then the earlier) is the mode's
choice. Writes ``OUT/results.json`` and ``OUT/command.txt``;
``sim.taskworld.features.ATTENTION_LAYERS`` records the choice for SmolLM2.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.retrieval_layer import needle_rank


@dataclass
class AttentionWindowArgs:
    """Choose the attention baseline's layer window per read mode on training tasks."""

    out: str = "results/attention-window-faithful"
    """Output folder: results.json, command.txt."""
    n_tasks: int = 6
    """Training tasks per kind and length."""
    kinds: tuple[str, ...] = ("passkey", "multikey")
    """Needle kinds (train split)."""
    lengths: tuple[int, ...] = (2048, 4096)
    """Tokens per task."""
    max_width: int = 6
    """Widest window considered (layers)."""
    w_max: int = 192
    """W_max of the stream (the faithful keys depend on it)."""
    seed: int = 0
    """Task seed (train split)."""
    lm: str = "smollm2"
    """'smollm2', 'tiny' or a local model folder."""


def window_table(masses: list[np.ndarray], needles: list[np.ndarray], max_width: int) -> dict:
    """Per window [lo, hi) of layers (width 1..``max_width``): MRR, hit@1 and hit@3 of the needle
    block, over tasks whose per-layer block masses are ``masses`` ((L, n_ctx) each)."""
    n_layers = masses[0].shape[0]
    table = {}
    for width in range(1, max_width + 1):
        for lo in range(0, n_layers - width + 1):
            ranks = np.array([needle_rank(m[lo : lo + width].mean(axis=0), nd)
                              for m, nd in zip(masses, needles, strict=True)], dtype=np.float64)
            table[f"{lo}-{lo + width}"] = {
                "lo": lo, "hi": lo + width, "mrr": float((1 / ranks).mean()),
                "hit1": float((ranks == 1).mean()), "hit3": float((ranks <= 3).mean()),
            }
    return table


def best_window(table: dict) -> dict:
    """The window with the highest MRR; ties go to the narrower, then the earlier."""
    return max(table.values(), key=lambda r: (round(r["mrr"], 12), -(r["hi"] - r["lo"]), -r["lo"]))


def main(argv: list[str] | None = None) -> dict:
    """Rank the needle block under every attention layer window, in each read mode, on training
    tasks; writes the JSON.
    Long by design: a measurement script read top to bottom, its steps sharing the loaded LM."""
    import torch
    from tqdm.auto import tqdm

    from megacontext.cli import parse, to_argv, versions
    from megacontext.lm import load_lm
    from megacontext.lm_oracle import LMOracle
    from sim.tasks import KINDS, TaskConfig, generate_tasks
    from sim.taskworld.features import block_mass
    from sim.taskworld.world import (
        CharTokenizer,
        TaskError,
        TaskWorldConfig,
        keystore,
        prepare_task,
    )

    args = parse(AttentionWindowArgs, argv)
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"error: --kinds: {bad} are not needle kinds ({', '.join(KINDS)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(
        " ".join(["python -m benchmarks.attention_window", *map(shlex.quote, to_argv(args))])
        + "\n"
    )
    model, tokenizer = load_lm(args.lm)
    oracle = LMOracle(model)
    tokenizer = tokenizer or CharTokenizer(model.config.vocab_size)
    from gistnet.gister import resolve_gister

    world = TaskWorldConfig(w_max=args.w_max)
    gister, gister_name = resolve_gister("auto", model, world.block_size)
    masses: dict[str, list[np.ndarray]] = {"faithful": [], "full-read": []}
    needles, kinds, skipped = [], [], []
    tasks = [
        t
        for kind in args.kinds
        for length in args.lengths
        for t in generate_tasks(
            TaskConfig(kind=kind, n_tasks=args.n_tasks, length=(length,), split="train",
                       seed=args.seed, depths=()),
            tokenizer if args.lm != "tiny" else None,
        )
    ]
    with torch.no_grad():
        for task in tqdm(tasks, desc="train tasks"):
            try:
                pt = prepare_task(task, oracle, tokenizer, world, gister, features=False,
                                  attention=True)
            except TaskError as err:
                skipped.append(str(err))
                continue
            b = world.block_size
            n_ctx = pt.query.start // b  # blocks wholly before the question
            needle = np.unique(np.flatnonzero(pt.needle) // b)
            needle = needle[needle < n_ctx]
            if not len(needle):
                skipped.append(f"task {task['id']!r}: no needle block before the question")
                continue
            full = keystore.read(oracle, pt.ids, b).probs(-1)
            for mode, probs in (("faithful", pt.attention_probs), ("full-read", full)):
                p = keystore.drop_sink(probs)  # (L, H, n)
                masses[mode].append(np.stack([block_mass(p[k], b)[:n_ctx]
                                              for k in range(p.shape[0])]))
            needles.append(needle)
            kinds.append((task.get("meta") or {}).get("kind"))
    modes = {}
    for mode, m in masses.items():
        table = window_table(m, needles, args.max_width)
        choice = best_window(table)
        n_layers = m[0].shape[0]
        modes[mode] = {
            "per_layer": {k: table[f"{k}-{k + 1}"] for k in range(n_layers)},
            "windows": table,
            "choice": {**choice, "fractions": [choice["lo"] / n_layers, choice["hi"] / n_layers]},
        }
    results = {
        "tasks": len(needles),
        "kinds": kinds,
        "skipped": skipped,
        "gister": gister_name,
        "modes": modes,
        "args": vars(args),
        "versions": versions(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for mode, r in modes.items():
        c = r["choice"]
        print(f"{mode}: layers {c['lo']}-{c['hi'] - 1} (MRR {c['mrr']:.3f}, hit@1 {c['hit1']:.3f},"
              f" hit@3 {c['hit3']:.3f}) on {len(needles)} training tasks")
    return results


if __name__ == "__main__":
    main()
