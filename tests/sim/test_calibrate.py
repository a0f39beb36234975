"""Score-scale calibration on a case whose answer is known: the exact oracle's own labels, shrunk.
"""

import numpy as np
import pytest

from megacontext.labels import label_snapshot
from sim.calibrate import fit_score_scale
from sim.policies import GreedyOracle, Recency
from sim.streamworld.world import evaluate_policy
from tests.sim.test_labels import small_world


class ShrunkOracle:
    """The exact labels times ``factor``: perfectly ordered, wrongly scaled."""

    name = "shrunk_oracle"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def apply(self, ep):
        ids, start = ep.query()
        y = label_snapshot(ep.wc, ep.oracle, ids, start, ep.config.n_tail_gists)["target_utilities"]
        return ep.refocus(self.factor * y.astype(np.float64))


def test_fit_undoes_a_known_shrink():
    """Labels shrunk 4x fall under tau_expand; the fitted scale brings them back (x4 or more acts
    like the oracle: x4 is the oracle itself), and nothing on the grid beats the picked value."""
    world = small_world()
    docs, shrink = [0, 1, 2], 0.25
    fit = fit_score_scale(
        lambda s: ShrunkOracle(shrink * s), world, docs, seed=5, grid=(0.5, 1.0, 2.0, 4.0, 8.0)
    )
    oracle = evaluate_policy(GreedyOracle(), world, docs, 5, progress=False)["nll"]
    shrunk = evaluate_policy(ShrunkOracle(shrink), world, docs, 5, progress=False)["nll"]
    assert shrunk > oracle + 1e-3  # the shrink does cost something here
    assert fit["score_scale"] >= 4.0
    at_unshrunk = fit["val_nll"][fit["grid"].index(4.0)]
    assert at_unshrunk == pytest.approx(oracle, abs=1e-9)  # x4 undoes the shrink: the oracle itself
    assert (
        fit["val_nll"][fit["grid"].index(fit["score_scale"])] == min(fit["val_nll"]) <= at_unshrunk
    )
    assert fit["tau_expand_equivalent"] == pytest.approx(
        world.allocator.tau_expand / fit["score_scale"]
    )
    # a scorer the scale cannot change is left alone (ties go to the value closest to 1)
    assert (
        fit_score_scale(lambda s: Recency(), world, docs, seed=5, grid=(0.5, 0.8, 2.0))[
            "score_scale"
        ]
        == 0.8
    )


def test_fit_rejects_bad_input():
    world = small_world()
    with pytest.raises(ValueError, match="grid"):
        fit_score_scale(lambda s: ShrunkOracle(s), world, [0], seed=0, grid=(0.0, 1.0))
    with pytest.raises(ValueError, match="document"):
        fit_score_scale(lambda s: ShrunkOracle(s), world, [], seed=0)


def test_task_calibration_picks_the_rank_gate_only_where_it_realises_more_gain(monkeypatch):
    """fit_task_calibration: the grid value with the lowest mean answer NLL; the rank gate where the
    same scorer's rank policy is lower still, the scale gate on a tie."""
    import types

    import sim.taskworld.scoring
    from sim.calibrate import fit_task_calibration

    def answer(policy, pt, oracle, config):  # a stand-in zoom: NLL set by the policy per task
        return {"answer_nll": policy(pt.task["id"]), "exact_match": 0.0, "expands": 1}

    monkeypatch.setattr(sim.taskworld.scoring, "answer_task", answer)
    tasks = [types.SimpleNamespace(task={"id": i}) for i in range(3)]
    config = types.SimpleNamespace(allocator=types.SimpleNamespace(tau_expand=0.2), w_max=64)

    def scaled(g):
        return lambda i: 1.0 + abs(g - 2.0) + 0.1 * i  # best at scale 2: mean NLL 1.1

    fit = fit_task_calibration(scaled, tasks, config, None, grid=(1.0, 2.0, 4.0))
    assert (fit["gate"], fit["score_scale"]) == ("scale", 2.0) and "rank_answer_nll" not in fit
    fit = fit_task_calibration(scaled, tasks, config, None, grid=(1.0, 2.0, 4.0),
                         rank_policy=lambda i: 0.5 + 0.1 * i)
    assert (fit["gate"], fit["score_scale"]) == ("rank", 2.0)
    assert fit["rank_answer_nll"] == pytest.approx(0.6) and fit["rank_expands_per_task"] == 1
    tie = fit_task_calibration(scaled, tasks, config, None, grid=(1.0, 2.0, 4.0),
                         rank_policy=lambda i: 1.0 + 0.1 * i)
    assert tie["gate"] == "scale"
