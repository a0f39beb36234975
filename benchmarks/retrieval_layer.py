"""Choose the dense retrieval baseline's layer and centring on *training* tasks only (DESIGN §9).

    python -m benchmarks.retrieval_layer --out results/retrieval-layer-seed0

Generates training tasks of every kind (``sim.tasks``, train split and phrasings: the held-out
tasks the baselines are reported on are never read), reads each task's L1 blocks and its query
alone as ``sim.taskworld.world.prepare_task`` does (position 0 left out of both), and scores every
layer with and without centring by the rank of the best needle block among the context's blocks
(mean reciprocal rank and hit@1 over tasks). Writes ``OUT/results.json`` (per layer and rule, the
choice) and ``OUT/command.txt``; ``sim.taskworld.world.RETRIEVAL_DEPTH`` records the choice for
SmolLM2.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RetrievalLayerArgs:
    """Choose the dense retrieval layer and centring on training tasks."""

    out: str = "results/retrieval-layer-seed0"
    """Output folder: results.json, command.txt."""
    n_tasks: int = 4
    """Training tasks per kind (passkey, multikey, vt, code)."""
    length: int = 2048
    """Tokens per task."""
    seed: int = 0
    """Task seed (train split)."""
    lm: str = "smollm2"
    """'smollm2', 'tiny' or a local model folder."""


def needle_rank(relevance: np.ndarray, needle_blocks: np.ndarray) -> int:
    """1 + the number of blocks scoring above the best needle block."""
    return int((relevance > relevance[needle_blocks].max()).sum()) + 1


def main(argv: list[str] | None = None) -> dict:
    """Rank the needle block under every layer's block-alone retrieval, with and without
    centring, on training tasks; writes the JSON.
    Long by design: a measurement script read top to bottom, its steps sharing the loaded LM."""
    import torch

    from megacontext.cli import parse, to_argv, versions
    from megacontext.lm import load_lm
    from megacontext.lm_oracle import LMOracle
    from sim.tasks import TaskConfig, generate_tasks
    from sim.taskworld.features import block_features, dense_relevance
    from sim.taskworld.world import CharTokenizer, TaskError, TaskWorldConfig, prepare_task

    args = parse(RetrievalLayerArgs, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(
        " ".join(["python -m benchmarks.retrieval_layer", *map(shlex.quote, to_argv(args))]) + "\n"
    )
    model, tokenizer = load_lm(args.lm)
    oracle = LMOracle(model)
    tokenizer = tokenizer or CharTokenizer(model.config.vocab_size)
    world = TaskWorldConfig()
    layers = list(range(model.config.num_hidden_layers + 1))
    ranks: dict[str, list[list[int]]] = {"centred": [], "raw": []}  # rule -> task -> per layer
    kinds = []
    with torch.no_grad():
        for kind in ("passkey", "multikey", "vt", "code"):  # its committed run's kinds
            cfg = TaskConfig(
                kind=kind,
                n_tasks=args.n_tasks,
                length=(args.length,),
                split="train",
                seed=args.seed,
                depths=(0.1, 0.3, 0.5, 0.7, 0.9),
            )
            for task in generate_tasks(cfg, tokenizer if args.lm != "tiny" else None):
                try:
                    pt = prepare_task(task, oracle, tokenizer, world, features=False)
                except (
                    TaskError
                ):  # e.g. a question longer than the tail under a character tokenizer
                    continue
                q = pt.query
                hidden, _, q_hidden = block_features(
                    oracle, pt.ids, world.block_size, pt.ids[q], layers
                )
                n_ctx = (
                    q.start // world.block_size
                )  # blocks wholly before the query (the rest stand in the tail)
                needle = np.unique(np.flatnonzero(pt.needle) // world.block_size)
                needle = needle[needle < n_ctx]
                if not len(needle):
                    continue
                kinds.append(kind)
                for rule in ranks:
                    ranks[rule].append(
                        [
                            needle_rank(
                                dense_relevance(hidden[k, :n_ctx], q_hidden[k], rule == "centred"),
                                needle,
                            )
                            for k in range(len(layers))
                        ]
                    )
    table = {}
    for rule, r in ranks.items():
        r = np.asarray(r, dtype=np.float64)  # (tasks, layers)
        table[rule] = {
            "mrr": (1 / r).mean(axis=0).tolist(),
            "hit1": (r == 1).mean(axis=0).tolist(),
            "mrr_by_kind": {
                k: (1 / r[np.array(kinds) == k]).mean(axis=0).tolist() for k in dict.fromkeys(kinds)
            },
        }
    rule, layer = max(
        ((rule, k) for rule in table for k in layers), key=lambda x: table[x[0]]["mrr"][x[1]]
    )
    results = {
        "layers": layers,
        "tasks": len(kinds),
        "kinds": kinds,
        "rules": table,
        "choice": {
            "rule": rule,
            "layer": layer,
            "depth": layer / model.config.num_hidden_layers,
            "mrr": table[rule]["mrr"][layer],
            "hit1": table[rule]["hit1"][layer],
        },
        "args": vars(args),
        "versions": versions(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"{len(kinds)} training tasks; best: {rule}, layer {layer} (MRR "
        f"{table[rule]['mrr'][layer]:.3f}, "
        f"hit@1 {table[rule]['hit1'][layer]:.3f})"
    )
    for k in layers:
        print(
            f"layer {k:2d}  centred MRR {table['centred']['mrr'][k]:.3f}  raw MRR "
            f"{table['raw']['mrr'][k]:.3f}"
        )
    return results


if __name__ == "__main__":
    main()
