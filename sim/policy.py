"""The one focus-policy protocol, for stream steps and question-time zoom alike.

Modelled on NVIDIA kvpress's ``ScorerPress``: a policy is a small class with a single
``scores(view)`` that returns one signed score per working-context entry (DESIGN §4: positive =
worth expanding, negative = the cost of collapsing its group); the base class applies them with one
allocator pass. The same object drives a stream step (``apply(episode)``, ``sim.streamworld.world``)
and each question-time zoom round (``sim.taskworld.world.zoom``). A ``FocusView`` is everything a
policy may read at one refocus. Policies are registered once, by name, in ``sim.policies``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from megacontext.allocator import Action
from megacontext.oracle import NLLOracle
from megacontext.working_context import WorkingContext


@dataclass
class FocusView:
    """What a policy may read at one refocus."""

    wc: WorkingContext
    """The working context to score (a stream step's may be over budget by up to K entries)."""
    n_tail_gists: int
    """Tail gists LensNet reads."""
    oracle: NLLOracle
    """The world's NLL oracle: only the exact-label oracle policy calls it."""
    target_ids: np.ndarray
    """The continuation the step is judged on (the next H tokens, or the task's answer): only the
    oracle policy reads it."""
    lookahead: bool = False
    """The oracle's expand gain of a level >= 2 gist sees two levels down."""
    task: Any = None
    """At question time: the task with its block text and features
    (``sim.taskworld.world.PreparedTask``; None in a stream). Typed loosely so this protocol sits
    below both worlds."""
    attention_window: tuple[float, float] = (0.0, 1.0)
    """At question time: the world's attention-baseline layer window (fractions of depth)."""


class StreamEpisode(Protocol):
    """What a stream step offers a policy (``sim.streamworld.world.Episode`` is one)."""

    def view(self) -> FocusView:
        """What a policy may read at this step."""
        ...

    def refocus(self, scores: np.ndarray) -> list[Action]:
        """Restore the budget and apply the allocator with ``scores``."""
        ...


@dataclass(frozen=True)
class PolicyContext:
    """What building a policy by name may need (``sim.policies.build_policy``)."""

    seed: int = 0
    """The run's seed (random baselines derive their draws from it)."""
    lensnet: Any = None
    """A trained ``lensnet.model.LensNet`` for the LensNet policies (None: they cannot be built)."""
    device: str = "cpu"
    """Where LensNet runs."""


class FocusPolicy:
    """Base class. A subclass sets ``name`` (and ``worlds``, where it applies) and gives
    ``scores(view)``; ``apply`` runs one allocator pass with them on a stream episode."""

    name: ClassVar[str] = "base"
    worlds: ClassVar[tuple[str, ...]] = ("stream", "tasks")
    """'stream': the synthetic and LM-text streams (``sim.run``); 'tasks': question time."""
    needs_features: ClassVar[bool] = False
    """Question time: the policy reads the block-alone hidden states or surprisal (computed once
    per task when any chosen policy needs them)."""
    needs_surprisal: ClassVar[bool] = False
    """Question time: of those features, the surprisal (the LM's whole depth and logits; without
    it the block-alone forwards stop at the retrieval layer)."""
    needs_attention: ClassVar[bool] = False
    """Question time: the policy reads the question's attention over the stream's keys
    (``PreparedTask.question_attention``, in the world's read mode: computed once per task when any
    chosen policy needs it, and in the faithful mode once per refocused context)."""
    reads_everything: ClassVar[bool] = False
    """The policy is the full stream as tokens (no working context): scored as the LM's ceiling."""

    @classmethod
    def build(cls, ctx: PolicyContext) -> FocusPolicy:
        """The policy for a run (``PolicyContext``); policies without arguments ignore it."""
        return cls()

    def scores(self, view: FocusView) -> np.ndarray:
        """(len(view.wc),) float64 signed scores, one per entry."""
        raise NotImplementedError

    def apply(self, ep: StreamEpisode) -> list[Action]:
        """One stream step: the allocator restores the budget with the scores, then expands/swaps.
        """
        return ep.refocus(self.scores(ep.view()))
