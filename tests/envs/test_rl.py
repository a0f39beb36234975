"""The PPO agent (``envs.rl``): its actor scores entries as LensNet does (one network per entry:
permutation-equivariant, any W_max), a LensNet-initialised actor acts exactly as LensNet at step 0,
the Gaussian's log-probability is the textbook one, and a short run end to end writes its curve,
agent and comparison."""

import json

import numpy as np
import pytest
import torch

from envs.policy_agent import observed_arrays
from envs.rl import (
    ActorPolicy,
    EntryActorCritic,
    RLArgs,
    _gaussian_logp,
    evaluate_actions,
    main,
    pointer_action,
    recency_action,
    sample_actions,
    to_batch,
    world_env,
)
from megacontext.working_context import ContextArrays


def _arrays(seed: int = 3, steps: int = 20) -> tuple[ContextArrays, object]:
    env = world_env(RLArgs(w_max=256))
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(steps):  # a context with gists of every level, some expanded
        obs, *_ = env.step(rng.uniform(-1, 1, env.n_slots))
    return observed_arrays(obs), env


def _permuted(a: ContextArrays, order: np.ndarray) -> ContextArrays:
    fields = {k: getattr(a, k) for k in a.__dataclass_fields__}
    for k, v in fields.items():
        if isinstance(v, np.ndarray) and v.shape[:1] == a.levels.shape and not k.startswith("tail"):
            fields[k] = v[order]
    return ContextArrays(**fields)


def test_the_actor_is_one_network_per_entry():
    """Permuting the entries permutes the mean scores and keeps the value, except for the slot
    input (an entry's place in the context), which moves with it; contexts of any length run."""
    a, env = _arrays()
    w = env.world
    torch.manual_seed(0)
    model = EntryActorCritic(w.tree.d_model, w.tree.max_level + 9).eval()
    with torch.no_grad():
        model.mean_head.weight.normal_()  # a read-out that is not ~0
        model.inputs.weight[:, w.tree.max_level + 3] = 0  # the slot-fraction input
        mean, value, _ = model(to_batch([a], w.tree.block_size, w.tree.max_level))
        order = np.random.default_rng(0).permutation(len(a.levels))
        p = _permuted(a, order)
        mean_p, value_p, _ = model(to_batch([p], w.tree.block_size, w.tree.max_level))
    torch.testing.assert_close(mean_p[0], mean[0][torch.as_tensor(order)], atol=1e-5, rtol=0)
    torch.testing.assert_close(value_p, value, atol=1e-5, rtol=0)
    assert (mean[0][~torch.as_tensor(a.can_expand | a.can_collapse)] == 0).all()
    # a batch of two contexts of different lengths gives each its own scores
    short = _arrays(seed=4, steps=2)[0]
    assert len(short.levels) != len(a.levels)
    with torch.no_grad():
        both, _, _ = model(to_batch([short, a], w.tree.block_size, w.tree.max_level))
    torch.testing.assert_close(both[1, : len(a.levels)], mean[0], atol=1e-5, rtol=0)


def test_a_lensnet_initialised_actor_acts_as_lensnet():
    from lensnet.model import LensNet, LensNetConfig
    from sim.policies import LensNetPolicy
    from sim.policy import FocusView

    a, env = _arrays()
    w = env.world
    torch.manual_seed(0)
    lens = LensNet(LensNetConfig.tiny(w.tree.d_model, block_size=w.tree.block_size,
                                      max_level=w.tree.max_level)).eval()
    with torch.no_grad():
        for p in lens.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = EntryActorCritic(w.tree.d_model, w.tree.max_level + 9, lensnet=lens,
                             score_scale=2.0).eval()
    view = FocusView(env.unwrapped.episode.wc, w.n_tail_gists, None, np.zeros(0, np.int64))
    ours = ActorPolicy(model, w.tree.block_size, w.tree.max_level, score_scale=2.0).scores(view)
    theirs = LensNetPolicy(lens).scores(view)
    assert np.abs(theirs).max() > 1e-3 and np.abs(theirs).max() < 2.0  # inside the action range
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_the_gaussian_log_probability_is_the_textbook_one():
    mean, u = torch.tensor([[0.1, -0.2, 0.0]]), torch.tensor([[0.3, -0.1, 0.7]])
    act = torch.tensor([[True, True, False]])
    log_std = torch.tensor(-1.0)
    lp, ent = _gaussian_logp(mean, log_std, u, act)
    ref = torch.distributions.Normal(mean, log_std.exp())
    assert lp.item() == pytest.approx(ref.log_prob(u)[0, :2].sum().item(), abs=1e-6)
    assert ent.item() == pytest.approx(ref.entropy()[0, 0].item(), abs=1e-6)


def test_a_short_run_writes_its_curve_agent_and_comparison(tmp_path, capsys):
    out = tmp_path / "rl"
    main(["--action", "scores", "--lr", "3e-4", "--total-steps", "128", "--n-envs", "2",
          "--rollout-steps", "32", "--epochs", "2", "--eval-docs", "2", "--eval-every", "2",
          "--out", str(out), "--no-progress"])
    curve = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in curve] == [64, 128]
    assert curve[1]["heldout_ngr"] is not None and np.isfinite(curve[0]["pg"])
    res = json.loads((out / "results.json").read_text())
    assert set(res["policies"]) == {"recency", "oracle", "ppo", "random", "cue"}
    assert res["policies"]["oracle"]["ngr"] == pytest.approx(1.0)
    assert len(res["policies"]["ppo"]["ngr_ci95"]) == 2
    assert (out / "agent.pt").exists() and (out / "curve.png").exists()
    assert "python -m envs.rl" in (out / "command.txt").read_text()
    assert "ppo" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="total_steps"):
        main(["--total-steps", "10", "--out", str(tmp_path / "bad")])


def test_the_pointer_scores_recency_and_one_chosen_gist():
    """The pointer's action is the recency policy's scores (the allocator restores with them)
    plus +1 on the chosen gist; its samples are gists or 'none', and their log-probabilities
    re-evaluate to the same values."""
    from megacontext.allocator import recency_scores

    a, env = _arrays()
    np.testing.assert_allclose(recency_action(a), recency_scores(env.unwrapped.episode.wc))
    gist = int(np.flatnonzero(a.can_expand)[0])
    u = pointer_action(a, gist)
    assert u[gist] == 1.0 and np.all(np.delete(u, gist) < 0)
    np.testing.assert_allclose(pointer_action(a, -1), recency_action(a))
    w = env.world
    torch.manual_seed(0)
    model = EntryActorCritic(w.tree.d_model, w.tree.max_level + 9).eval()
    short = _arrays(seed=4, steps=2)[0]
    batch = to_batch([a, short], w.tree.block_size, w.tree.max_level)
    with torch.no_grad():
        k, logp, _ = sample_actions("pointer", model, batch, [a, short])
        again, _, _ = evaluate_actions("pointer", model, batch, [a, short], list(k))
    for x, arr in zip(k.tolist(), (a, short), strict=True):
        assert x == -1 or arr.can_expand[x]
    torch.testing.assert_close(again, logp)


def test_a_pointer_run_and_its_refusals(tmp_path):
    out = tmp_path / "rl"
    main(["--action", "pointer", "--total-steps", "64", "--n-envs", "2", "--rollout-steps", "32",
          "--epochs", "1", "--eval-docs", "2", "--out", str(out), "--no-progress"])
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["action"] == "pointer" and res["policies"]["ppo"]["ngr"] is not None
    with pytest.raises(SystemExit, match="pointer learns alone"):
        main(["--action", "pointer", "--init", "x.pt", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="minibatches"):
        main(["--n-envs", "1", "--rollout-steps", "2", "--minibatches", "3", "--total-steps", "4",
              "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="action must be"):
        main(["--action", "dice", "--out", str(tmp_path / "bad")])
