"""The task kinds and their one registry, ``TASK_KINDS``: each kind is one class holding its name
and its own task maker; a needle kind (RULER-style: filler, needles placed at a depth, a question)
also holds its needle and question phrasings per split (train and held-out disjoint) and draws its
own needles and answer. A new kind is one class added to ``TASK_KINDS``, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sim.tasks.code import CodeContinuation
from sim.tasks.families import FAMILY_KINDS
from sim.tasks.needles import (
    CONSONANTS,
    KEY_WORDS,
    NeedleKind,
    Needles,
    TaskKind,
    Template,
)

if TYPE_CHECKING:
    from sim.tasks import TaskConfig

__all__ = ["CONSONANTS", "KEY_WORDS", "TASK_KINDS", "NeedleKind", "TaskKind", "Template"]


class PassKey(NeedleKind):
    """'passkey': one 5-digit pass key, stated twice in one needle, asked back."""

    name = "passkey"
    templates = {
        "train": (
            (
                "The pass key is {v}. Remember it. {v} is the pass key.",
                "",
                "What is the pass key? The pass key is",
            ),
            (
                "Keep this number in mind: the secret number is {v}. Once more, the secret number "
                "is "
                "{v}.",
                "",
                "Recall the secret number from the text. The secret number is",
            ),
        ),
        "heldout": (
            (
                "The secret access code is {v}. Do not forget it: {v} is the secret access code.",
                "",
                "What is the secret access code? The secret access code is",
            ),
            (
                "Note well that the hidden PIN equals {v}. Again, the hidden PIN equals {v}.",
                "",
                "Which value does the hidden PIN equal? The hidden PIN equals",
            ),
        ),
    }

    def needles(
        self, c: TaskConfig, rng: np.random.Generator, template: Template, depth: float
    ) -> tuple[Needles, list[int], str, str]:
        first, _, question = template
        v = str(rng.integers(10_000, 100_000))
        return [(first.format(v=v), depth)], [0], question, f" {v}"


_MAGIC = "the special magic number for {k} mentioned in the provided text"


class MultiKey(NeedleKind):
    """'multikey': ``n_keys`` 7-digit magic numbers, each under its own key; one key is asked at the
    depth, the others distract at uniform depths."""

    name = "multikey"
    templates = {
        "train": (
            (
                "One of the special magic numbers for {k} is: {v}.",
                "",
                f"What is {_MAGIC}? {_MAGIC.capitalize()} is",
            ),
            (
                "The registered number of the {k} is {v}.",
                "",
                "What is the registered number of the {k}? The registered number of the {k} is",
            ),
        ),
        "heldout": (
            (
                "Among the catalogue entries, the reference code for {k} reads {v}.",
                "",
                "Which reference code was listed for {k} above? The reference code for {k} reads",
            ),
            (
                "Record: {k} has serial {v}.",
                "",
                "What serial does {k} have? Per the record, {k} has serial",
            ),
        ),
    }

    def needles(
        self, c: TaskConfig, rng: np.random.Generator, template: Template, depth: float
    ) -> tuple[Needles, list[int], str, str]:
        first, _, question = template
        keys = [KEY_WORDS[i] for i in rng.choice(len(KEY_WORDS), c.n_keys, replace=False)]
        values = (rng.choice(9_000_000, c.n_keys, replace=False) + 1_000_000).astype(str)
        depths = [depth, *rng.uniform(0.0, 1.0, c.n_keys - 1)]  # key 0 is asked, the rest distract
        needles = [
            (first.format(k=k, v=v), d) for k, v, d in zip(keys, values, depths, strict=True)
        ]
        return needles, [0], question.format(k=keys[0]), f" {values[0]}"


class VariableTracking(NeedleKind):
    """'vt': ``n_chains`` chains of ``chain_length`` variables, a 5-digit value handed down each
    chain by hops; the answer is the asked chain's variables in order."""

    name = "vt"
    templates = {
        "train": (
            (
                "VAR {a} = {v}.",
                "VAR {b} = VAR {a}.",
                "Find all variables that are assigned the value {v} in the text above. Answer: in "
                "order, the variables assigned the value {v} are",
            ),
            (
                "The variable {a} is set to {v}.",
                "The variable {b} is set to the value of {a}.",
                "Which variables hold the value {v}? In order of assignment, they are",
            ),
        ),
        "heldout": (
            (
                "Let {a} equal {v}.",
                "Let {b} equal {a}.",
                "Trace the number {v} through the passage. Listed in sequence, the names equal to "
                "{v} "
                "are",
            ),
            (
                "Assign {v} to {a}.",
                "Copy {a} into {b}.",
                "Which names receive the number {v}? Following each copy, they are",
            ),
        ),
    }

    def needles(
        self, c: TaskConfig, rng: np.random.Generator, template: Template, depth: float
    ) -> tuple[Needles, list[int], str, str]:
        first, later, question = template
        n_chains, chain_length = c.n_chains, c.chain_length
        names: list[str] = []
        while len(names) < n_chains * chain_length:  # distinct names of 4 consonants (no words)
            name = "".join(CONSONANTS[x] for x in rng.integers(0, len(CONSONANTS), 4))
            if name not in names:
                names.append(name)
        values = (rng.choice(90_000, n_chains, replace=False) + 10_000).astype(str)
        needles: Needles = []
        for i in range(n_chains):  # chain 0 is asked: it starts at the depth, its hops follow it
            chain = names[i * chain_length : (i + 1) * chain_length]
            d = np.sort(rng.uniform(depth if i == 0 else 0.0, 1.0, chain_length))
            d[0] = depth if i == 0 else d[0]
            needles.append((first.format(a=chain[0], v=values[i]), float(d[0])))
            needles += [
                (later.format(a=a, b=b), float(x))
                for a, b, x in zip(chain, chain[1:], d[1:], strict=False)
            ]
        answer = " " + " ".join(names[:chain_length])
        return needles, list(range(chain_length)), question.format(v=values[0]), answer


TASK_KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (PassKey(), MultiKey(), VariableTracking(), CodeContinuation(), *FAMILY_KINDS)
}
"""Every task kind by name: the one place a kind is added. A kind's position is part of its tasks'
seed (``default_rng([seed, split, kind, i])``), so a new kind is appended, never inserted."""
