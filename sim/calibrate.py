"""Calibration of a scorer's scale against the allocator's thresholds (DESIGN §10, "order first,
then calibration").

The allocator's thresholds are in nats (``tau_expand`` = 0.2): a scorer whose order is right but
whose values are shrunk (regression towards the many zero labels does that) never clears them and
acts as recency. ``fit_score_scale`` picks the factor that the scores are multiplied by (which is
the same as dividing ``tau_expand`` by it; ``tau_swap`` = 0 is scale-free) by the realised gain on
*validation* episodes: the mean NLL of the policy over whole documents, one run per grid value.
The documents must be validation documents (never the held-out ones the study reports on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from megacontext.tree import ConfigError
from sim.streamworld.world import Episode, WorldConfig, evaluate_policy

DEFAULT_GRID: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)


def _grid(grid: Sequence[float]) -> list[float]:
    """The grid as floats; every value must be a positive finite scale."""
    grid = [float(g) for g in grid]
    if not grid or any(not (math.isfinite(g) and g > 0) for g in grid):
        raise ValueError(f"grid must hold positive finite scales, got {grid}")
    return grid


def _pick(grid: list[float], nll: np.ndarray) -> int:
    """Index of the lowest NLL; ties (within 1e-9 nats) go to the scale closest to 1."""
    tied = [i for i in range(len(grid)) if nll[i] <= nll.min() + 1e-9]
    return min(tied, key=lambda i: abs(math.log(grid[i])))


def fit_score_scale(
    make_policy: Callable[[float], object],
    world: WorldConfig,
    doc_ids: Sequence[int],
    seed: int,
    grid: Sequence[float] = DEFAULT_GRID,
    episode_factory: Callable[[WorldConfig, int, int], Episode] | None = None,
) -> dict:
    """The grid value whose policy has the lowest mean NLL over ``doc_ids``.

    ``make_policy(scale)`` returns a policy whose scores are multiplied by ``scale``. Ties (within
    1e-9 nats) go to the value closest to 1 (no change unless it helps). Returns ``score_scale``,
    ``tau_expand_equivalent`` (the allocator's ``tau_expand`` / scale), and per grid value the mean
    NLL and expands per step, with the documents used."""
    grid = _grid(grid)
    if not doc_ids:
        raise ValueError("calibration needs at least one validation document")
    runs = [
        evaluate_policy(
            make_policy(g), world, doc_ids, seed, progress=False, episode_factory=episode_factory
        )
        for g in grid
    ]
    nll = np.array([r["nll"] for r in runs])
    pick = _pick(grid, nll)
    return {
        "score_scale": grid[pick],
        "tau_expand_equivalent": world.allocator.tau_expand / grid[pick],
        "grid": grid,
        "val_nll": nll.tolist(),
        "val_expands_per_step": [r["expands_per_step"] for r in runs],
        "val_docs": [int(d) for d in doc_ids],
        "w_max": world.context.w_max,
    }


TASK_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""Scales tried for a task-world LensNet (its cheap labels are attention masses, not nats)."""


def fit_task_calibration(
    make_policy: Callable[[float], object],
    tasks: Sequence,
    config,
    oracle,
    grid: Sequence[float] = TASK_GRID,
    rank_policy: object | None = None,
) -> dict:
    """The task world's calibration: the grid value whose policy (``make_policy(scale)``) has the
    lowest mean answer NLL over the prepared *validation* tasks ``tasks`` after the question-time
    zoom (the realised gain: recency's NLL minus it; ties go to the value closest to 1).

    With ``rank_policy`` (the same scorer's order on the rank scale) the gate is chosen too:
    ``gate`` = 'rank' where that policy's mean answer NLL is lower than every grid value's, else
    'scale' (ties keep the scale). Returns ``gate``, ``score_scale``, ``tau_expand_equivalent``,
    per grid value the mean answer NLL, exact match and expands per task, and the rank gate's."""
    from sim.taskworld.scoring import answer_task

    grid = _grid(grid)
    if not tasks:
        raise ValueError("calibration needs at least one validation task")
    sealed = [str(pt.task.get("id")) for pt in tasks if (pt.task.get("meta") or {}).get("sealed")]
    if sealed:  # the tasks arrive prepared: their meta is what is left of a sealed file
        raise ConfigError(
            f"tasks {sealed[:3]} are sealed test-split tasks (meta.sealed); sim.calibrate "
            f"trains/calibrates/selects and may not read them; use dev tasks"
        )
    def means(policy) -> tuple[float, float, float]:  # mean answer NLL, exact match, expands
        rs = [answer_task(policy, pt, oracle, config) for pt in tasks]
        return tuple(float(np.mean([r[k] for r in rs]))
                     for k in ("answer_nll", "exact_match", "expands"))

    nll, em, expands = (list(col) for col in zip(*(means(make_policy(g)) for g in grid),
                                                  strict=True))
    pick = _pick(grid, np.array(nll))
    out = {
        "gate": "scale",
        "score_scale": grid[pick],
        "tau_expand_equivalent": config.allocator.tau_expand / grid[pick],
        "grid": grid,
        "val_answer_nll": nll,
        "val_exact_match": em,
        "val_expands_per_task": expands,
        "val_tasks": [str(pt.task.get("id")) for pt in tasks],
        "w_max": config.w_max,
    }
    if rank_policy is not None:
        rank_nll, rank_em, rank_expands = means(rank_policy)
        out.update(rank_answer_nll=rank_nll, rank_exact_match=rank_em,
                   rank_expands_per_task=rank_expands)
        if rank_nll < min(nll) - 1e-9:
            out["gate"] = "rank"
    return out


def fit_task_scale(*args, **kwargs) -> dict:
    """Deprecated name of ``fit_task_calibration`` (it fits the gate as well as the scale)."""
    import warnings

    warnings.warn("sim.calibrate.fit_task_scale is now fit_task_calibration", DeprecationWarning,
                  stacklevel=2)
    return fit_task_calibration(*args, **kwargs)
