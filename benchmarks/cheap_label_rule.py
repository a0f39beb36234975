"""Choose the cheap label's attention rule on *training* tasks only (issue 18, item 3).

    python -m benchmarks.cheap_label_rule --out results/cheap-label-rule-seed0

Reads the committed train task files (``results/tasks-{passkey,multikey}-seed0/tasks-train.jsonl``;
held-out files are never read), runs each stream with its answer teacher-forced after it through
the LM once (``sim.taskworld.keystore.read``), and ranks the context's L1 blocks (those wholly
before the question) by several rules over the answer-predicting positions' attention, the sink
token left out (``sim.taskworld.keystore.drop_sink``; the committed results predate that and ranked
block 0 last). A task's rank is that of its best needle block. Writes ``OUT/results.json``
(per rule: hit@1, hit@3, the ranks) and ``OUT/command.txt``;
``sim.taskworld.features.answer_relevance`` implements the choice.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.taskworld.features import answer_rows_relevance

TRAIN_FILES = (
    "results/tasks-passkey-seed0/tasks-train.jsonl",
    "results/tasks-multikey-seed0/tasks-train.jsonl",
)


@dataclass
class CheapLabelRuleArgs:
    """Compare answer-attention label rules on training tasks."""

    out: str = "results/cheap-label-rule-seed0"
    """Output folder: results.json, command.txt."""
    tasks: tuple[str, ...] = field(default_factory=lambda: TRAIN_FILES)
    """Training task files."""
    n_tasks: int = 8
    """Tasks read from each file."""
    lm: str = "smollm2"
    """'smollm2', 'tiny' or a local model folder."""


def rule_masses(rows: np.ndarray, n_blocks: int, b: int) -> dict[str, np.ndarray]:
    """Per rule the (n_blocks,) relevance from answer rows (R, L, H, n): R positions (the last
    stream token first), L layers, H heads."""
    mass = rows[..., : n_blocks * b].reshape(*rows.shape[:3], n_blocks, b).sum(-1)  # R, L, H, B
    n_layers = rows.shape[1]
    late = slice(round(21 / 30 * n_layers), round(26 / 30 * n_layers))
    return {
        "mean_heads_all_layers": mass.mean(axis=(0, 1, 2)),
        "mean_heads_layers_21_25": mass[:, late].mean(axis=(0, 1, 2)),
        "mean_heads_answer_only": mass[1:].mean(axis=(0, 1, 2)) if len(mass) > 1 else mass[0].mean(
            axis=(0, 1)
        ),
        "mean_heads_last_token_layers_21_25": mass[:1, late].mean(axis=(0, 1, 2)),
        "max_heads_all_layers": answer_rows_relevance(rows, n_blocks, b),  # the labels' rule
        "max_heads_layers_21_25": mass[:, late].max(axis=2).mean(axis=(0, 1)),
    }


def main(argv: list[str] | None = None) -> dict:
    from megacontext.cli import parse, to_argv, versions
    from megacontext.lm import load_lm
    from megacontext.lm_oracle import LMOracle
    from sim.tasks.jsonl import read_tasks, refuse_sealed
    from sim.taskworld.world import CharTokenizer, keystore, tokenize_task

    args = parse(CheapLabelRuleArgs, argv)
    for path in args.tasks:  # a rule chosen here is a design choice: never on the sealed split
        refuse_sealed(path, "benchmarks.cheap_label_rule")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(
        " ".join(["python -m benchmarks.cheap_label_rule", *map(shlex.quote, to_argv(args))]) + "\n"
    )
    model, tok = load_lm(args.lm)
    tok = tok or CharTokenizer(model.config.vocab_size)
    oracle = LMOracle(model)
    b = 32
    ranks: dict[str, list[int]] = {}
    ids_seen = []
    for path in args.tasks:
        for task in read_tasks(path)[: args.n_tasks]:
            ids, answer, needle, q_len, _ = tokenize_task(task, tok)
            n = len(ids)
            store = keystore.read(oracle, np.concatenate([ids, answer[:-1]]), b, len(answer))
            # the sink is token 0 (sim.taskworld.keystore.drop_sink), as in
            # sim.taskworld.features.answer_relevance
            rows = np.stack([keystore.drop_sink(store.probs(r, n_keys=n))
                             for r in range(len(answer))])
            n_blocks = (n - q_len) // b  # blocks wholly before the question
            needle_blocks = [j for j in np.unique(np.flatnonzero(needle) // b) if j < n_blocks]
            for name, rel in rule_masses(rows, n_blocks, b).items():
                best = max(rel[j] for j in needle_blocks)
                ranks.setdefault(name, []).append(int((rel > best).sum()) + 1)
            ids_seen.append(task["id"])
    results = {
        name: {
            "hit1": sum(r == 1 for r in rk) / len(rk),
            "hit3": sum(r <= 3 for r in rk) / len(rk),
            "ranks": rk,
        }
        for name, rk in ranks.items()
    }
    doc = {"config": vars(args), "tasks": ids_seen, "rules": results, "versions": versions()}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=list))
    for name, r in results.items():
        print(f"{name:40s} hit@1 {r['hit1']:.2f} hit@3 {r['hit3']:.2f}")
    return doc


if __name__ == "__main__":
    main()
