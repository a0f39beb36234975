"""The sealed test split (DESIGN.md §11, "Blind evaluation"): held-out task files drawn once, by one
command, with seeds no dev file has used, and evaluated once, at the end, by one committed command.

``python -m sim.tasks.sealed --out DIR --seed N`` draws one JSONL file per cell of a design
(``DESIGNS``: kind, length and config per cell; the sizes are config fields; by default the
template kinds' cells; ``--design families`` the needle families' held-out factors, with a decoy
cell) with ``sim.tasks.generate_tasks`` on the held-out split's
filler, modules and phrasings, the asked needle at a uniform depth per task. Each cell draws from
its own seed, derived from N and the cell's name (so passkey-2k, -4k and -8k share no draws), and
every task's meta says ``"sealed": true`` and ``"eval_split": "test"`` (its ``split`` stays the
filler split, 'heldout'). DIR gets ``SEALED.json`` (the command, the seed, each cell's
``TaskConfig``, its task count and sha256) and a README. A split is drawn once: a DIR that holds a
``SEALED.json`` is refused, and so is a seed of ``USED_SEEDS``. Every command that trains,
calibrates or selects refuses these files (``sim.tasks.jsonl.refuse_sealed``); ``sim.evaluate``
reads them only with ``--open-sealed``. A length N means context + question + answer hold at
most N tokens under the tokenizer (``TaskConfig``), so passkey-8k fits SmolLM2's 8192 positions.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megacontext.cli import to_argv, to_dict
from megacontext.tree import ConfigError
from sim.tasks import TaskConfig, generate_tasks
from sim.tasks.jsonl import SEALED_MANIFEST, file_sha256, write_jsonl

USED_SEEDS: tuple[int, ...] = (0, 20261203)
"""``sim.tasks`` seeds of the task files drawn so far, which a sealed split may not reuse (the same
seed redraws the same held-out tasks). From results/*/command*.txt and results/*/README.md (and
each committed file's meta.seed): results/heldout-24 (the dev files of every task-world study so
far), results/tasks-{passkey,multikey,code}-seed0 (``python -m sim.taskstudy``, seed 0) and
results/tasks-vt-heldout all use the default seed 0, as do the train-split tasks of
``sim.tasklabels`` in scripts/task_lensnet_study.sh (``--train.seed 1, 2`` there are LensNet
training seeds, not task seeds). A spent sealed split's seed joins this list: 20261203 drew
results/sealed-1, published in README.md and docs/results.md (spent)."""

Cell = tuple[str, int, dict[str, Any]]
"""(task kind, tokens of context + question + answer, other ``TaskConfig`` fields)."""
DESIGNS: dict[str, dict[str, Cell]] = {
    "families": {
        "passkey-2k": ("niah-single", 2048, {"value_type": "digits5", "lead": "echo"}),
        "passkey-4k": ("niah-single", 4096, {"value_type": "digits5", "lead": "echo"}),
        "multikey-2k": ("niah-multikey", 2048, {"n_keys": 4, "lead": "echo"}),
        "decoy-2k": ("niah-single", 2048, {"value_type": "digits5", "decoys": 3,
                                           "lead": "echo"}),
        "passkey-8k": ("niah-single", 8192, {"value_type": "digits5", "lead": "echo"}),
        "code-2k": ("code", 2048, {}),
    },
    "templates": {
        "passkey-2k": ("passkey", 2048, {}),
        "passkey-4k": ("passkey", 4096, {}),
        "multikey-2k": ("multikey", 2048, {}),
        "passkey-8k": ("passkey", 8192, {}),
        "code-2k": ("code", 2048, {}),
    },
}
"""Design -> cell name (its file is NAME.jsonl) -> cell. 'families': the needle families' held-out
factors (``sim.tasks.families``: phrasings, keys, value shapes and
words no training or dev task uses), a pass key of 5 digits, multi-key values of any held-out
type, and a decoy cell (3 sentences that repeat the question's subject without a value); every
question ends with its needle's own link words (``lead='echo'``: with independent leads the 135M
LM answers no dev single needle even with the whole stream in view, results/families-1/dev-echo).
'templates': the template kinds' held-out phrasings (results/sealed-1 was drawn with it; those
phrasings are dev data since)."""
DEFAULT_DESIGN = "templates"
"""The design a split draws unless told: 'templates'. The families are not the default yet: on
their dev split SmolLM2-135M answers 2 of 48 tasks with the whole stream in context
(results/families-1/dev-selectors; words and codes as values, the question worded apart from
the needle), so their cells would not tell selectors apart by exact match."""
CELLS = DESIGNS[DEFAULT_DESIGN]
"""The default design's cells."""

NOTE = (
    "Sealed test split: evaluate it once, with the committed command (scripts/sealed_test.sh), at "
    "the end of a study. Never train, calibrate or select on it (those commands refuse it). A "
    "published table spends the split: the next study draws a fresh one with a new seed, and this "
    "seed joins sim.tasks.sealed.USED_SEEDS."
)


@dataclass
class SealedConfig:
    """Draw a sealed test split of held-out task files, once (DESIGN.md §11)."""

    out: str = ""
    """Output folder (required); it must not hold a SEALED.json already."""
    seed: int | None = None
    """Seed of the split (required): not one of sim.tasks.sealed.USED_SEEDS; each cell's seed
    derives from it and the cell's name."""
    tokenizer: str = "smollm2"
    """Token counter for lengths: 'smollm2' (the evaluated LM's), 'chars' (~4 characters a
    token: tests only) or a tokenizer folder."""
    design: str = field(default=DEFAULT_DESIGN, metadata={"choices": lambda: tuple(DESIGNS)})
    """The cells (sim.tasks.sealed.DESIGNS): 'templates' (results/sealed-1's design, the default)
    or 'families' (the needle families' held-out factors, with a decoy cell)."""
    passkey_2k: int = 48
    """Tasks of the passkey-2k cell (pass key, 2048 tokens)."""
    passkey_4k: int = 48
    """Tasks of the passkey-4k cell (pass key, 4096 tokens)."""
    multikey_2k: int = 48
    """Tasks of the multikey-2k cell (4-key multi-key needle, 2048 tokens)."""
    passkey_8k: int = 24
    """Tasks of the passkey-8k cell (pass key, 8192 tokens: the LM's positions)."""
    code_2k: int = 24
    """Tasks of the code-2k cell (module continuation, 2048 tokens)."""
    decoy_2k: int = 48
    """Tasks of the decoy-2k cell ('families' only: a pass key with 3 decoys, 2048 tokens)."""

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise ConfigError(f"design must be one of {tuple(DESIGNS)}, got {self.design!r}")
        if self.seed is not None:
            if self.seed < 0:
                raise ConfigError(f"seed must be >= 0, got {self.seed}")
            if self.seed in USED_SEEDS:
                raise ConfigError(
                    f"seed {self.seed} was used by existing task files (USED_SEEDS = "
                    f"{USED_SEEDS}); a sealed split needs a new seed"
                )
        bad = {cell: n for cell, n in self.sizes().items() if n < 1}
        if bad:
            raise ConfigError(f"every cell needs at least 1 task, got {bad}")

    def sizes(self) -> dict[str, int]:
        """Cell name (of the design's cells) -> number of tasks (the field of the same name)."""
        return {cell: getattr(self, cell.replace("-", "_")) for cell in DESIGNS[self.design]}


def cell_seed(seed: int, cell: str) -> int:
    """The seed of one cell's ``TaskConfig``: a 32-bit draw of a ``SeedSequence`` of ``seed`` and
    the cell name's bytes (stable across runs and machines, unlike ``hash``)."""
    return int(np.random.SeedSequence([seed, *cell.encode()]).generate_state(1)[0])


def cell_configs(config: SealedConfig) -> dict[str, TaskConfig]:
    """Each cell's ``TaskConfig``: held-out split, uniform depths, its own seed."""
    assert config.seed is not None, "cell_configs needs a seed"
    out = Path(config.out)
    configs = {
        cell: TaskConfig(
            kind=kind,
            n_tasks=config.sizes()[cell],
            length=(length,),
            depths=(),  # uniform per task
            split="heldout",
            seed=cell_seed(config.seed, cell),
            tokenizer=config.tokenizer,
            out=str(out / f"{cell}.jsonl"),
            **extra,
        )
        for cell, (kind, length, extra) in DESIGNS[config.design].items()
    }
    seeds = [c.seed for c in configs.values()]
    assert len(set(seeds)) == len(seeds), f"cell seeds collide: {seeds}"
    reused = sorted(set(seeds) & set(USED_SEEDS))
    if reused:  # a 32-bit draw equal to a used seed: vanishingly rare, but never silent
        raise ConfigError(f"seed {config.seed} derives a used cell seed {reused}: pick another")
    return configs


def _readme(command: str, manifest: dict[str, Any]) -> str:
    cells = ", ".join(f"`{cell}.jsonl` ({c['n_tasks']})" for cell, c in manifest["cells"].items())
    return (
        f"Sealed test split (DESIGN.md §11), drawn once by `{command}`: {cells} held-out tasks "
        f"(held-out filler, modules and phrasings; seed {manifest['seed']}, each cell's own seed "
        f"and config in `SEALED.json` with the files' sha256). Every command that trains, "
        f"calibrates or selects refuses these files; `sim.evaluate` reads them only with "
        f"`--open-sealed`. Evaluate them once, with the committed command "
        f"(`scripts/sealed_test.sh`), at the end of a study; a published table spends the split, "
        f"and the next study draws a fresh one with a new seed (`python -m sim.tasks.sealed`).\n"
    )


def draw_sealed(config: SealedConfig) -> dict[str, Any]:
    """Draw every cell into ``config.out`` and seal it (``SEALED.json``, README.md); returns the
    manifest. Raises ``ConfigError`` when the seed or folder is missing, or the folder is sealed."""
    if config.seed is None or not config.out:
        raise ConfigError("--out DIR and --seed N are required (a split is drawn once)")
    out = Path(config.out)
    if (out / SEALED_MANIFEST).exists():
        raise ConfigError(
            f"{out} already holds a sealed split ({out / SEALED_MANIFEST}): a split is drawn once; "
            f"draw a fresh one into a new folder with a new seed"
        )
    from megacontext.cli import versions

    command = " ".join(["python -m sim.tasks.sealed", *map(shlex.quote, to_argv(config))])
    cells: dict[str, dict[str, Any]] = {}
    for cell, cfg in cell_configs(config).items():
        tasks = generate_tasks(cfg)
        for task in tasks:
            task["meta"].update(sealed=True, eval_split="test", cell=cell)
        write_jsonl(tasks, cfg.out)
        cells[cell] = {
            "file": f"{cell}.jsonl",
            "n_tasks": len(tasks),
            "sha256": file_sha256(cfg.out),
            "config": to_dict(cfg),
        }
    manifest = {
        "command": command,
        "seed": config.seed,
        "design": config.design,
        "tokenizer": config.tokenizer,
        "cells": cells,
        "n_tasks": sum(c["n_tasks"] for c in cells.values()),
        "note": NOTE,
        "versions": versions(),
    }
    (out / "README.md").write_text(_readme(command, manifest))
    with open(out / SEALED_MANIFEST, "x") as f:  # exclusive: two draws into one folder, one wins
        f.write(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    from megacontext.cli import run_cli

    config, manifest = run_cli(SealedConfig, draw_sealed, argv, (ConfigError, FileExistsError))
    print(f"sealed {manifest['n_tasks']} tasks in {len(manifest['cells'])} cells into {config.out}")


if __name__ == "__main__":
    if sys.argv[0].endswith("sealed.py"):  # name the command in usage lines (as unittest does)
        sys.argv[0] = "python -m sim.tasks.sealed"
    main()
