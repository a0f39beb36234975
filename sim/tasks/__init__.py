"""Long-context task generators (DESIGN.md §9, RULER-style): pass key, multi-key needle, variable
tracking, plus whole standard-library modules as long-range real text.

A task is one JSON line ``{"id", "context", "question", "answer", "needle_spans", "meta"}``: the LM
reads ``context + question`` as one stream and the answer (a leading-space string such as
``" 48213"``) is scored as its continuation; ``needle_spans`` are the ``[start, end)`` character
spans of ``context`` that hold what the answer needs. Filler is real text (§7): the pydoc topics of
the split plus the docstrings of the split's standard-library modules, never repeated sentences. The
split is GistNet's (``gistnet.corpus``: pydoc topics and standard-library modules, by top-level
package, into train / validation / held-out): held-out tasks read held-out text only, training
tasks training text only (the validation text is used by neither), so train and held-out share
neither filler text nor modules, no GistNet trained on that split has read a held-out task, and the
needle and question phrasings (``TEMPLATES``) of the two splits are disjoint too. A length N
means context + question + answer hold at most N tokens (so a task fits an LM with N positions),
usually within 1% and never fewer than N - max(24, 3% of N), under a ``count_tokens`` callable (a
tokenizer, or ~4 characters a token). Depth d puts the asked needle at fraction d of the context's
characters, at a sentence or paragraph start. Every draw comes from a seeded
``numpy.random.Generator``.

The package: ``filler`` (the split, filler text, needle placement, token counting), ``kinds`` (one
class per task kind and ``TASK_KINDS``, the one registry a new kind is added to), ``code`` (the
code-continuation kind), ``jsonl`` (task files); this module holds the config, the generation and
the command line (``python -m sim.tasks``), and re-exports the names the other modules import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from megacontext.tree import ConfigError
from sim.tasks.code import make_code_task
from sim.tasks.families import FACTORS, FAMILY_KINDS, FamilyKind, check_family_config
from sim.tasks.filler import (
    CHARS_PER_TOKEN,
    MAX_GAP,
    SHARED_RUN,
    SPLITS,
    _check_split,
    approx_tokens,
    code_documents,
    filler_sources,
    module_split,
    shares_seen_text,
    token_counter,
)
from sim.tasks.jsonl import TaskFileError, read_tasks, scan_tasks, write_jsonl
from sim.tasks.kinds import CONSONANTS, KEY_WORDS, TASK_KINDS, NeedleKind, TaskKind, Template
from sim.tasks.needles import TaskDraw

__all__ = [
    "ALL_KINDS",
    "FACTORS",
    "FAMILIES",
    "FAMILY_KINDS",
    "FamilyKind",
    "CHARS_PER_TOKEN",
    "CONSONANTS",
    "KEY_WORDS",
    "KINDS",
    "MAX_GAP",
    "SHARED_RUN",
    "SPLITS",
    "TASK_KINDS",
    "TEMPLATES",
    "NeedleKind",
    "TaskConfig",
    "TaskFileError",
    "TaskKind",
    "Template",
    "approx_tokens",
    "code_documents",
    "filler_sources",
    "generate_tasks",
    "main",
    "make_code_task",
    "make_task",
    "module_split",
    "read_tasks",
    "scan_tasks",
    "shares_seen_text",
    "token_counter",
    "write_jsonl",
]

KINDS = tuple(name for name, kind in TASK_KINDS.items() if isinstance(kind, NeedleKind))
"""The needle kinds (RULER-style: filler + needles + a question), as registered at import."""
FAMILIES = tuple(name for name, kind in TASK_KINDS.items() if isinstance(kind, FamilyKind))
"""The needle families (``sim.tasks.families``: every factor split train / dev / heldout)."""
ALL_KINDS = tuple(TASK_KINDS)
"""Every kind as registered at import (``code``: continuation of a standard-library module where
the next lines use a name defined far above)."""
TEMPLATES: dict[str, dict[str, tuple[Template, ...]]] = {
    name: kind.templates
    for name, kind in TASK_KINDS.items()
    if isinstance(kind, NeedleKind) and not isinstance(kind, FamilyKind)
}
"""kind -> split -> [(needle, hop (vt only), question)] of the needle kinds, as registered at
import: {v} value, {k} key, {a} -> {b} a vt hop."""


@dataclass
class TaskConfig:
    """Generate long-context tasks (pass key, multi-key needle, variable tracking) as JSONL."""

    kind: str = field(default="passkey", metadata={"choices": lambda: tuple(TASK_KINDS)})
    """Task kind, a name of the registry sim.tasks.kinds.TASK_KINDS, such as 'passkey' (5 digits),
    'multikey' (7-digit magic numbers, one asked), 'vt' (variable tracking), 'code' (module
    continuation; depths do not apply)."""
    n_tasks: int = 10
    """Number of tasks."""
    length: tuple[int, ...] = (2048,)
    """Tokens of context + question + answer: at most this, usually within 1% (so a task fits an LM
    with this many positions); task i takes length[i % len(length)]."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Depth of the asked needle as a fraction of the context; task i takes
    depths[(i // len(length)) % len(depths)]; empty = uniform per task."""
    split: Literal["train", "dev", "heldout"] = "train"
    """Filler text, modules and phrasings: 'train', 'dev' (the niah-* families and code only) or
    'heldout' (test), disjoint."""
    n_keys: int = 4
    """multikey, niah-multikey, niah-multiquery: keyed needles per task (niah-multikey: one asked,
    the others distract); niah-multivalue: keys per task (one asked, stated n_values times)."""
    n_values: int = 3
    """niah-multivalue: values of the asked key (all asked)."""
    n_queries: int = 2
    """niah-multiquery: keys asked in the one question (<= n_keys)."""
    decoys: int = 0
    """niah-*: decoy sentences (the question's subject, no value) at uniform depths."""
    cycle_filler: bool = False
    """Needle kinds: when the split's filler text runs out (held-out text holds about 22k
    tokens), start its documents again, so streams far past it can be drawn (the text repeats;
    the task's meta says ``cycle_filler``). Off: such a length is an error."""
    value_type: str = "any"
    """niah-*: the value type, 'any' (drawn per task from the split's types) or one of the split's
    sim.tasks.families.VALUE_TYPES, e.g. 'digits5' or 'code:LL-DDDD' for heldout."""
    lead: str = "independent"
    """niah-*: the question's last words, 'independent' (the split's own leads) or 'echo' (the
    asked needle's own link words, which a small LM can copy after; single and multi-key only)."""
    n_chains: int = 2
    """vt: assignment chains per task (one asked, the others distractors)."""
    chain_length: int = 3
    """vt: variables per chain (chain_length - 1 hops)."""
    answer_tokens: int = 32
    """code: tokens of the scored continuation (whole lines, cut at a word end past this)."""
    near_chars: int = 1024
    """code: the name the continuation uses is defined, and otherwise absent, before the context's
    last this many characters."""
    seed: int = 0
    """Seed: task i draws from numpy.random.default_rng([seed, split, kind, i])."""
    tokenizer: str = "chars"
    """Token counter for lengths: 'chars' (~4 characters a token, no model), 'smollm2', or a
    tokenizer folder."""
    out: str = "tasks.jsonl"
    """Output JSONL file (command line only)."""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"kind must be one of {tuple(TASK_KINDS)}, got {self.kind!r}")
        if self.answer_tokens < 1 or self.near_chars < 0:
            raise ConfigError(
                f"need answer_tokens >= 1 and near_chars >= 0, got "
                f"{self.answer_tokens}, {self.near_chars}"
            )
        _check_split(self.split)
        splits = getattr(TASK_KINDS[self.kind], "splits", SPLITS)
        if self.split not in splits:
            raise ConfigError(
                f"kind {self.kind!r} has no {self.split!r} split (its splits: {splits}); the "
                f"niah-* families have train, dev and heldout"
            )
        if isinstance(TASK_KINDS[self.kind], FamilyKind):
            check_family_config(self)
        else:  # the families' fields mean nothing to another kind: never silently ignored
            names = ["n_values", "n_queries", "decoys", "value_type", "lead"]
            names += ["cycle_filler"] if self.kind == "code" else []
            set_ = [k for k in names if getattr(self, k) != self.__dataclass_fields__[k].default]
            if set_:
                raise ConfigError(
                    f"kind {self.kind!r} does not read {', '.join(set_)} (the niah-* kinds do)"
                )
        if self.n_tasks < 1 or self.seed < 0 or not self.length or min(self.length) < 64:
            raise ConfigError(
                f"need n_tasks >= 1, seed >= 0, lengths >= 64 tokens; got "
                f"{self.n_tasks}, {self.seed}, {self.length}"
            )
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"depths must lie in [0, 1], got {self.depths}")
        if (
            self.n_keys < 1
            or self.n_keys > len(KEY_WORDS)
            or self.n_chains < 1
            or self.chain_length < 2
        ):
            raise ConfigError(
                f"need 1 <= n_keys <= {len(KEY_WORDS)}, n_chains >= 1, chain_length >= 2"
            )


def make_task(
    config: TaskConfig, i: int, count_tokens: Callable[[str], int], counter: str = "chars"
) -> dict[str, Any]:
    """Task ``i`` of ``config``; it depends only on the config and i (``counter`` names
    ``count_tokens`` in the task's meta). The seed's kind is its position in ``TASK_KINDS``."""
    c = config
    kind_index = list(TASK_KINDS).index(c.kind)
    rng = np.random.default_rng([c.seed, SPLITS.index(c.split), kind_index, i])
    n = c.length[i % len(c.length)]
    return TASK_KINDS[c.kind].make_task(TaskDraw(c, i, n, rng, count_tokens, counter))


def generate_tasks(config: TaskConfig, count_tokens: Any = None) -> list[dict[str, Any]]:
    """``config.n_tasks`` tasks; ``count_tokens`` (a tokenizer or callable) overrides
    ``config.tokenizer``."""
    name = (
        config.tokenizer
        if count_tokens is None
        else getattr(count_tokens, "name_or_path", "custom")
    )
    if count_tokens is None and name != "chars":
        from transformers import AutoTokenizer

        from megacontext.lm import DEFAULT_LM, smollm2_folder

        folder = smollm2_folder() if name == DEFAULT_LM else name
        count_tokens = AutoTokenizer.from_pretrained(folder)
    count = token_counter(count_tokens)
    return [make_task(config, i, count, name) for i in range(config.n_tasks)]


def main(argv: list[str] | None = None) -> None:
    from megacontext.cli import run_cli

    config, tasks = run_cli(TaskConfig, generate_tasks, argv, (ConfigError,))
    write_jsonl(tasks, config.out)
    print(f"wrote {len(tasks)} {config.kind} tasks ({config.split}) to {config.out}")
