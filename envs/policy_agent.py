"""Acting in MegaFocus-v0 with any registered stream policy, from the observation alone.

``observed_arrays`` rebuilds the ``ContextArrays`` LensNet reads from an observation (the env
carries every field); ``ObservedContext`` is the working context as the observation shows it, the
read-only part of ``WorkingContext`` a stream policy's ``scores(view)`` reads; ``PolicyAgent``
turns a ``sim.policies`` policy into an agent whose action is its scores in the env's convention
(scores / ``score_scale``). Acting through the env then gives the same NLL, step for step, as
``sim.streamworld.world.evaluate_policy`` (``tests/envs``: to 1e-6 for recency, random, cue and
LensNet).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from megacontext.tree import ConfigError
from megacontext.working_context import ContextArrays
from sim.policies import CueReference, GreedyOracle
from sim.policy import FocusPolicy, FocusView


def observed_arrays(obs: Mapping[str, np.ndarray]) -> ContextArrays:
    """The ``ContextArrays`` of the observed context (padding dropped), as
    ``WorkingContext.arrays(n_tail_gists)`` gave them to the env."""
    n = int(np.asarray(obs["valid_mask"]).sum())

    def entries(key: str, dtype=None) -> np.ndarray:
        x = np.asarray(obs[key])[:n]
        return x if dtype is None else x.astype(dtype)

    return ContextArrays(
        embeddings=entries("embeddings"),
        position_ids=entries("position_ids"),
        levels=entries("levels"),
        node_index=entries("node_index"),
        span_start=entries("span_start"),
        span_width=entries("span_width"),
        distance_to_cursor=entries("distance_to_cursor"),
        can_expand=entries("can_expand", bool),
        can_collapse=entries("can_collapse", bool),
        group_id=entries("group_id"),
        expand_cost=entries("expand_cost"),
        collapse_refund=entries("collapse_refund"),
        tail_gists=np.asarray(obs["tail_gists"]),
        tail_levels=np.asarray(obs["tail_levels"]),
        tail_mask=np.asarray(obs["tail_mask"]).astype(bool),
        n_tokens=int(obs["n_tokens"]),
    )


class ObservedContext:
    """The working context as an observation shows it: what a stream policy reads of a
    ``WorkingContext`` (its length, entries, spans, cursor and ``arrays``), nothing more, so a
    policy that reaches further (the tree, the oracle) fails loudly instead of reading the world."""

    def __init__(self, obs: Mapping[str, np.ndarray]) -> None:
        self._arrays = observed_arrays(obs)
        self.n_tail_gists = self._arrays.tail_mask.shape[0]
        self.levels = self._arrays.levels
        self.indices = self._arrays.node_index
        self.starts = self._arrays.span_start
        self.widths = self._arrays.span_width
        self.ends = self.starts + self.widths
        self.n_tokens = self._arrays.n_tokens

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    def arrays(self, n_tail_gists: int = 6, max_positions: int | None = None) -> ContextArrays:
        """The observed ``ContextArrays`` (the env's ``n_tail_gists``; positions as observed)."""
        if n_tail_gists != self.n_tail_gists:
            raise ValueError(
                f"the observation holds {self.n_tail_gists} tail gists, not {n_tail_gists}"
            )
        return self._arrays


class PolicyAgent:
    """A ``sim.policies`` stream policy acting in MegaFocus-v0: ``act(obs)`` scores the observed
    context with ``policy.scores(view)`` and returns the scores in the env's convention, float64
    ``scores / score_scale`` over the action's ``n_slots`` (0 past the context).

    The view is built from the observation alone (``ObservedContext``; no oracle, no target), except
    for the two policies defined by privileged reads, which take them from ``env.unwrapped``
    (a single env, not a vector): ``oracle`` labels the env's own episode (its tree, oracle and next
    H tokens: ``Episode.view()``), and ``cue`` reads the synthetic generator's config through the
    episode's oracle. ``all_coarse`` acts on the episode itself rather than through one score
    vector, so it cannot act through the env (``TypeError``).

    Scores beyond ±``score_scale`` would be clipped by the action space and the allocator would act
    differently from ``sim.run``: ``act`` raises ``ValueError`` then, unless ``clip=True`` clips
    them on purpose. With ``score_scale`` a power of two the scores reach the allocator exactly.
    """

    def __init__(
        self,
        policy: FocusPolicy,
        score_scale: float = 1.0,
        env=None,
        clip: bool = False,
    ) -> None:
        if type(policy).apply is not FocusPolicy.apply:
            raise TypeError(
                f"policy {policy.name!r} acts on the episode itself, not through one score vector "
                "per step: it cannot act through the env"
            )
        if "stream" not in policy.worlds:
            raise ConfigError(f"policy {policy.name!r} does not apply to a stream")
        self.privileged = isinstance(policy, GreedyOracle | CueReference)
        if self.privileged and env is None:
            raise ConfigError(
                f"policy {policy.name!r} reads the world beyond the observation: pass env= (a "
                "single MegaFocusEnv) to take it from env.unwrapped"
            )
        if env is not None:
            score_scale = env.unwrapped.score_scale
        if not (np.isfinite(score_scale) and score_scale > 0):
            raise ConfigError(f"score_scale must be a positive number, got {score_scale}")
        self.policy, self.score_scale, self.env, self.clip = policy, float(score_scale), env, clip

    def view(self, obs: Mapping[str, np.ndarray]) -> FocusView:
        """What the policy reads at this step (see the class docstring)."""
        wc = ObservedContext(obs)
        if isinstance(self.policy, GreedyOracle):
            view = self.env.unwrapped.episode.view()
            assert np.array_equal(view.wc.levels, wc.levels) and np.array_equal(
                view.wc.indices, wc.indices
            ), "the env's episode is not the observed one (was obs from another env or step?)"
            return view
        oracle = self.env.unwrapped.episode.oracle if self.privileged else None
        no_target = np.zeros(0, dtype=np.int64)
        return FocusView(wc, wc.n_tail_gists, oracle, no_target)  # type: ignore[arg-type]

    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n_slots,) float64: the policy's scores of the observed entries / ``score_scale``."""
        scores = np.asarray(self.policy.scores(self.view(obs)), dtype=np.float64)
        n_slots = np.asarray(obs["valid_mask"]).shape[0]
        assert scores.shape == (int(np.asarray(obs["valid_mask"]).sum()),), "one score per entry"
        action = np.zeros(n_slots, dtype=np.float64)
        action[: scores.shape[0]] = scores / self.score_scale
        peak = float(np.abs(action).max(initial=0.0))
        if peak > 1.0:
            if not self.clip:
                raise ValueError(
                    f"policy {self.policy.name!r} scored |u| = {peak * self.score_scale:.3g} > "
                    f"score_scale {self.score_scale}: clipping would change what the allocator "
                    "does; make the env with a larger score_scale (a power of two keeps scores "
                    "exact) or pass clip=True"
                )
            action = np.clip(action, -1.0, 1.0)
        return action
