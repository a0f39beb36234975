"""Focus policies and their evaluation: the baselines every LensNet result is compared against.

A policy acts on an ``Episode`` once per step, after the cursor has ingested K tokens (the
context may be over budget): its scores go through the allocator, which restores the budget with
them and then expands/swaps. ``Recency`` restores oldest-first and expands nothing (the newest
detail stays at L0), ``AllCoarse`` collapses every legal group (the coarsest
legal cover: tail at L0, everything older as coarse as it can be), ``RandomScores`` feeds
Gaussian scores to the allocator, ``GreedyOracle`` feeds the exact counterfactual labels
(``label_snapshot``: exact in the synthetic world). LensNet's policy lives in ``lensnet.policy``
and has the same ``apply``. ``evaluate_policy`` runs held-out documents and reports NLL, budget
use, swap rate and time per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from sim.allocator import Action, recency_scores
from sim.labels import label_snapshot
from sim.synthetic import SyntheticConfig, cue_scores
from sim.world import Episode, WorldConfig, synthetic_episode


class Recency:
    name = "recency"

    def apply(self, ep: Episode) -> list[Action]:
        return ep.refocus(recency_scores(ep.wc))


class AllCoarse:
    name = "all_coarse"

    def apply(self, ep: Episode) -> list[Action]:
        actions = ep.restore()
        b = ep.wc.block_size
        while (starts := ep.wc.group_starts()).size:
            s = int(starts[0])
            parent = (int(ep.wc.levels[s]) + 1, int(ep.wc.indices[s]) // b)
            actions.append(Action("collapse", *parent, ep.wc.collapse(*parent)))
        return actions


class RandomScores:
    name = "random"

    def __init__(self, rng: np.random.Generator, scale: float = 1.0) -> None:
        self.rng, self.scale = rng, scale

    def apply(self, ep: Episode) -> list[Action]:
        return ep.refocus(self.rng.normal(scale=self.scale, size=len(ep.wc)))


class CueReference:
    """The synthetic world's past-only reference (``sim.synthetic.cue_scores``): the ceiling of what
    a scorer reading LensNet's inputs can reach. Synthetic episodes only."""

    name = "cue"

    def apply(self, ep: Episode) -> list[Action]:
        synthetic = getattr(ep.oracle, "config", None)
        if not isinstance(synthetic, SyntheticConfig):
            raise TypeError("the cue reference reads the synthetic generator's structure: synthetic episodes only")
        return ep.refocus(cue_scores(ep.arrays(), synthetic))


class GreedyOracle:
    """Scores = the exact counterfactual utilities of every action (one oracle call per action)."""

    name = "oracle"

    def apply(self, ep: Episode) -> list[Action]:
        ids, start = ep.query()
        labels = label_snapshot(ep.wc, ep.oracle, ids, start, ep.config.n_tail)
        return ep.refocus(labels["target_utilities"].astype(np.float64))


def evaluate_policy(
    policy,
    world: WorldConfig,
    doc_ids: Sequence[int],
    seed: int,
    progress: bool = True,
    episode_factory: Callable[[WorldConfig, int, int], Episode] | None = None,
    on_step: Callable[[str, Episode, list[Action]], None] | None = None,
) -> dict:
    """Run ``policy`` over documents; NLL is measured after each refocus, on the next H tokens."""
    make = episode_factory or (lambda w, d, s: synthetic_episode(w, d, s)[0])
    per_doc, slots, times = [], [], []
    n_steps = n_collapse = n_expand = n_forced = 0
    for doc in tqdm(doc_ids, desc=f"eval {policy.name}", disable=not progress, leave=False):
        ep = make(world, doc, seed)
        nlls = []
        while ep.wc.n_tokens < ep.n_doc_tokens:
            ep.advance()
            if not ep.can_query():
                break
            t0 = time.perf_counter()
            actions = policy.apply(ep)
            times.append(time.perf_counter() - t0)
            ep.wc.check_invariants()  # budget (and every other invariant) after every step
            n_expand += sum(a.kind == "expand" for a in actions)
            n_collapse += sum(a.kind == "collapse" and not a.forced for a in actions)
            n_forced += sum(a.forced for a in actions)
            nlls.append(ep.nll())
            slots.append(len(ep.wc))
            n_steps += 1
            if on_step is not None:
                on_step(policy.name, ep, actions)
        per_doc.append(float(np.mean(nlls)))
    per_doc_arr = np.asarray(per_doc)
    return {
        "nll": float(per_doc_arr.mean()),
        "nll_std_over_docs": float(per_doc_arr.std(ddof=1)) if len(per_doc) > 1 else 0.0,
        "nll_per_doc": per_doc,
        "budget_use": float(np.mean(slots) / world.context.w_max),
        "max_slots": int(np.max(slots)),
        "w_max": world.context.w_max,
        "expands_per_step": n_expand / max(n_steps, 1),
        "swap_rate": n_collapse / max(n_steps, 1),
        "restores_per_step": n_forced / max(n_steps, 1),
        "ms_per_step": 1e3 * float(np.mean(times)),
        "steps": n_steps,
    }


def nll_gap_recovered(results: dict[str, dict]) -> dict[str, float | None]:
    """NGR = (NLL_recency - NLL_policy) / (NLL_recency - NLL_oracle) for every policy."""
    rec, orc = results["recency"]["nll"], results["oracle"]["nll"]
    gap = rec - orc
    return {name: ((rec - r["nll"]) / gap if abs(gap) > 1e-12 else None) for name, r in results.items()}
