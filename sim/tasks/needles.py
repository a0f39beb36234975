"""The needle kinds' base (RULER-style: filler, needles placed at a depth, a question): the
``TaskKind`` protocol every kind meets, ``NeedleKind`` (fits filler around a kind's needles and
question; a subclass draws them), and the key and name alphabets the kinds share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from megacontext.tree import ConfigError
from sim.tasks.filler import _filler, _place, filler_sources

if TYPE_CHECKING:
    from sim.tasks import TaskConfig

Template = tuple[str, str, str]
"""(needle, hop (vt only), question): {v} value, {k} key, {a} -> {b} a vt hop."""
Needles = list[tuple[str, float]]
"""(needle text, depth) pairs."""
CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"
KEY_WORDS = tuple(
    """apple badger candle dolphin emerald falcon garnet harbor iris jasmine kettle
lantern maple nectar otter pepper quartz raven saddle tulip urchin violet walrus yarrow zephyr
anchor bramble cobalt dune feather glacier hazel ivory juniper kiwi lotus meadow nutmeg orchid
pebble quill ribbon sparrow thistle velvet willow""".split()
)
"""Multi-key keys (the same for both splits: keys are neither filler nor phrasing)."""


class TaskDraw(NamedTuple):
    """What one task is drawn from (``sim.tasks.make_task``): task ``i`` of config ``c``, at most
    ``n`` tokens under ``count_tokens`` (``counter`` names it in the task's meta), every draw from
    ``rng``."""

    c: TaskConfig
    i: int
    n: int
    rng: np.random.Generator
    count_tokens: Callable[[str], int]
    counter: str


class TaskKind(Protocol):
    """A task kind: its name (its key in ``TASK_KINDS``) and the maker of its tasks."""

    name: str

    def make_task(self, d: TaskDraw) -> dict[str, Any]:
        """The task ``d`` describes."""
        ...


class NeedleKind:
    """A needle kind: real filler of the split with needles placed in it and a question. A subclass
    sets ``name`` and ``templates`` and draws its needles and answer (``needles``)."""

    name: str
    templates: dict[str, tuple[Template, ...]]
    """split -> the phrasings (a task draws one); no phrase is shared by the two splits."""

    splits: tuple[str, ...] = ("train", "heldout")
    """The task splits the kind has phrasings for."""

    def needles(
        self, c: TaskConfig, rng: np.random.Generator, template: Template, depth: float
    ) -> tuple[Needles, list[int], str, str]:
        """(needles with depths, indices of the asked ones, question, answer) of one task phrased
        by ``template``, the asked needle at ``depth``."""
        raise NotImplementedError

    def draw(
        self, c: TaskConfig, rng: np.random.Generator, depth: float
    ) -> tuple[Needles, list[int], str, str, dict[str, Any]]:
        """(needles, asked, question, answer, meta entries) of one task: a template of the split
        drawn and phrased by ``needles`` (meta ``template``: its index)."""
        options = self.templates[c.split]
        t = int(rng.integers(len(options)))
        return (*self.needles(c, rng, options[t], depth), {"template": t})

    def make_task(self, d: TaskDraw) -> dict[str, Any]:
        """Task ``i`` of ``c``: the asked needle at depth ``depths[(i // len(length)) %
        len(depths)]`` (uniform when there are none), filler up to ``n`` tokens for the whole
        stream (context, question and answer), refilled until the stream lands within 1%."""
        c, i, n, rng, count_tokens, counter = d
        depth = float(c.depths[(i // len(c.length)) % len(c.depths)] if c.depths else rng.uniform())
        needles, asked, question, answer, drawn = self.draw(c, rng, depth)
        question = "\n\n" + question
        sources = filler_sources(c.split)
        sources = [sources[j] for j in rng.permutation(len(sources))]
        # the whole stream lands at most n tokens: it fits an LM with n positions
        tol = max(8, n // 100)
        parts = (question, answer, *(x for x, _ in needles))
        budget = n - tol // 2 - sum(count_tokens(x) + 1 for x in parts)
        best: tuple[int, str, list[list[int]]] | None = None
        for _ in range(6):  # the sum of parts misses a few tokens at joins: correct and refill
            if budget < 1:
                raise ConfigError(
                    f"length {n} leaves no room for filler around the needles and question"
                )
            filler = _filler(sources, budget, count_tokens, tol // 4, c.cycle_filler)
            context, spans = _place(filler, needles)
            total = count_tokens(context + question) + count_tokens(answer)
            if total <= n and (best is None or total > best[0]):
                best = (total, context, spans)
            if n - tol <= total <= n:
                break
            budget += n - tol // 2 - total
        if best is None or best[0] < n - 3 * tol:
            raise ConfigError(
                f"could not fit task {i} into [{n - 3 * tol}, {n}] tokens (last try {total})"
            )
        _, context, spans = best
        return {
            "id": f"{c.kind}-{c.split}-s{c.seed}-{i:05d}",
            "context": context,
            "question": question,
            "answer": answer,
            "needle_spans": [spans[j] for j in asked],
            "meta": {
                "kind": c.kind,
                "split": c.split,
                "length": n,
                "depth": depth,
                **drawn,
                "tokenizer": counter,
                **({"cycle_filler": True} if c.cycle_filler else {}),
                "seed": c.seed,
            },
        }
