"""MegaFocus-v0: gymnasium's checker, registration, determinism, invariants from observations alone,
the reward recomputed through the oracle from the refocused context, the observation against the
context's own arrays, every stream policy acting through the env against ``sim.run``'s path, and
the vector envs."""

import dataclasses
import functools
import os
import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers MegaFocus-v0)
from envs.megafocus_env import MegaFocusEnv
from envs.policy_agent import ObservedContext, PolicyAgent, observed_arrays
from megacontext.tree import ConfigError, MegaContextTree
from megacontext.working_context import ContextArrays, WorkingContext
from sim.policies import REGISTRY, build_policy, policy_names
from sim.policy import PolicyContext
from sim.streamworld.world import Episode, evaluate_policy

SMALL = dict(
    block_size=4,
    max_level=2,
    w_max=40,
    step_tokens=4,
    horizon=8,
    tail_tokens=8,
    n_tail_gists=3,
    doc_blocks=60,
    d_model=8,
)


def check_obs_invariants(
    obs: dict, *, w_max: int, b: int, max_level: int, tail_tokens: int, step_tokens: int
) -> None:
    """Every invariant of DESIGN §2 that the observation can show, re-derived from its arrays (the
    observed context has just ingested up to K tokens: the budget holds up to those), and every
    derived key (position, node index, group, costs, tail) against its definition."""
    valid = obs["valid_mask"].astype(bool)
    n = int(valid.sum())
    assert n <= w_max + step_tokens and np.all(valid[:n]) and not np.any(valid[n:]), (
        "valid entries must be a prefix"
    )  # budget before the step's restore
    lv, start, width = obs["levels"][:n], obs["span_start"][:n], obs["span_width"][:n]
    end = start + width
    t = int(end[-1])
    assert int(obs["n_tokens"]) == t
    assert np.all(obs["distance_to_cursor"][:n] == t - end)
    assert np.array_equal(obs["position_ids"][:n], np.arange(n)), "slot positions"
    assert np.array_equal(obs["node_index"][:n] * width, start), "node index within its level"
    assert start[0] == 0 and np.all(end[:-1] == start[1:]), "contiguity"
    assert np.all(np.diff(start) > 0), "monotonic timeline"
    assert np.all(width == b**lv), "level consistency"
    assert np.all(start % width == 0), "block alignment"
    assert np.all((lv >= 0) & (lv <= max_level))
    assert np.all(lv[end > t - tail_tokens] == 0), "recency tail"
    assert np.array_equal(obs["can_expand"][:n].astype(bool), lv >= 1), "L0 never expands"
    cc = obs["can_collapse"][:n].astype(bool)
    assert not np.any(cc & (lv == max_level)), "max level never collapses"
    assert not np.any(cc & (end > t - tail_tokens)), "nothing in the tail collapses"
    # legal groups come in whole, aligned runs of b same-level siblings (no partial swaps)
    i = 0
    while i < n:
        if cc[i]:
            assert (
                np.all(cc[i : i + b])
                and np.all(lv[i : i + b] == lv[i])
                and (start[i] // width[i]) % b == 0
            )
            i += b
        else:
            i += 1
    gid = obs["group_id"][:n]
    assert np.array_equal(gid >= 0, cc), "a group id exactly where the group can collapse"
    firsts = gid[cc]
    assert np.all(cc[firsts] & (start[firsts] // width[firsts] % b == 0)), "id = first member"
    assert np.all(np.arange(n)[cc] - firsts < b), "members follow their first within b slots"
    np.testing.assert_array_equal(obs["expand_cost"][:n], np.where(lv >= 1, b - 1, 0))
    np.testing.assert_array_equal(
        obs["collapse_refund"][:n], np.where(cc, np.float32((b - 1) / b), 0)
    )
    tail_lv, tail_mask = obs["tail_levels"], obs["tail_mask"].astype(bool)
    assert np.array_equal(tail_lv >= 0, tail_mask) and np.all(tail_lv[tail_mask] >= 1)
    assert not np.any(obs["tail_gists"][~tail_mask]), "tail padding is zero"
    zero_padded = ("embeddings", "levels", "span_start", "span_width", "can_expand")
    zero_padded += ("can_collapse", "position_ids", "node_index", "expand_cost", "collapse_refund")
    for k in zero_padded:
        assert not np.any(obs[k][n:]), f"padding of {k} must be zero"
    assert np.all(obs["group_id"][n:] == -1), "padding of group_id must be -1"


def test_check_env_passes_without_warnings():
    env = gymnasium.make(
        "MegaFocus-v0", **SMALL
    ).unwrapped  # made: carries a spec for the render check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env)


def test_make_registered_id_and_time_limit():
    env = gymnasium.make("MegaFocus-v0", **SMALL, max_episode_steps=5)
    env.reset(seed=1)
    truncated = False
    for _ in range(5):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
    assert truncated and not terminated
    env = gymnasium.make("envs:MegaFocus-v0", **SMALL)
    assert isinstance(env.unwrapped, MegaFocusEnv)


def test_make_without_importing_envs(tmp_path):
    """The installed megafocus-gym.pth registers MegaFocus-v0 on ``import gymnasium`` alone (a fresh
    interpreter outside the repository, so nothing but the installed package can register it)."""
    code = (
        "import sys, gymnasium; env = gymnasium.make('MegaFocus-v0', block_size=4, max_level=2, "
        "w_max=40, "
        "step_tokens=4, horizon=8, tail_tokens=8, n_tail_gists=3, doc_blocks=60, d_model=8); "
        "env.reset(seed=0); "
        "print(type(env.unwrapped).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGAFOCUS_NO_GYM_HOOK")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "MegaFocusEnv"
    # and the switch really switches it off (so the test above cannot pass by accident)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**env, "MEGAFOCUS_NO_GYM_HOOK": "1"},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "NameNotFound" in out.stderr


def test_seeded_lockstep_determinism():
    a, b = MegaFocusEnv(**SMALL), MegaFocusEnv(**SMALL)
    oa, _ = a.reset(seed=42)
    ob, _ = b.reset(seed=42)
    a.action_space.seed(0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        for k in oa:
            np.testing.assert_array_equal(oa[k], ob[k])
        act = rng.uniform(-1, 1, size=a.n_slots).astype(np.float32)
        oa, ra, ta, _, ia = a.step(act)
        ob, rb, tb, _, ib = b.step(act)
        assert ra == rb and ta == tb and ia == ib
        if ta:
            oa, _ = a.reset()
            ob, _ = b.reset()
    oc, _ = MegaFocusEnv(**SMALL).reset(seed=43)
    assert not np.array_equal(oc["embeddings"], a.reset(seed=42)[0]["embeddings"])


def test_long_random_action_run_keeps_every_invariant():
    """Invariants from the observations alone, and (``debug=True``) the env's own
    ``check_invariants()`` of the working context after every step."""
    steps = 10_000 if os.environ.get("CI") else 1_500
    env = MegaFocusEnv(**SMALL, score_scale=5.0, debug=True)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    n_expand = n_collapse = 0
    for s in range(steps):
        check_obs_invariants(
            obs,
            w_max=SMALL["w_max"],
            b=SMALL["block_size"],
            max_level=SMALL["max_level"],
            tail_tokens=SMALL["tail_tokens"],
            step_tokens=SMALL["step_tokens"],
        )
        scale = [0.05, 0.5, 100.0][s % 3]  # mild, strong and saturating scores
        act = np.clip(rng.normal(scale=scale, size=env.n_slots), -1, 1).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(act)
        assert np.isfinite(reward) and info["slots_used"] <= SMALL["w_max"]
        n_expand += sum(a[0] == "expand" for a in info["actions"])
        n_collapse += info["swap_count"]
        if terminated or truncated:
            obs, _ = env.reset()
    assert n_expand > 100 and n_collapse > 100  # the run really moved the focus


def _oracle_nll(
    env: MegaFocusEnv,
    levels: np.ndarray,
    indices: np.ndarray,
    n_tokens: int,
    over_budget: bool = False,
) -> float:
    """The oracle's NLL of the H tokens after ``n_tokens``, with a context rebuilt from its entries
    (``over_budget``: a context the agent observed, which may hold up to K entries over w_max)."""
    ep = env.episode
    config = env.world.context
    if over_budget:
        config = dataclasses.replace(config, w_max=env.n_slots)
    wc = WorkingContext(ep.tree, config)
    wc.levels, wc.indices, wc.n_tokens = levels.copy(), indices.copy(), n_tokens
    wc.check_invariants()
    query = ep.token_ids[n_tokens : n_tokens + env.world.horizon]
    assert len(query) == env.world.horizon
    return float(ep.oracle.nll([wc.arrays(env.n_tail_gists)], query, n_tokens)[0])


@pytest.mark.parametrize("oracle", ["synthetic", "lm"])
def test_reward_is_the_oracle_nll_of_the_refocused_context(oracle, monkeypatch):
    """reward = -(oracle NLL of the next H tokens after the refocused context, before the next
    ingest),
    recomputed here from the agent's context captured just before its tree ingests the next tokens
    (nothing else changes the context between the refocus and that ingest)."""
    if oracle == "synthetic":
        env, n_steps, min_moved = MegaFocusEnv(**SMALL, score_scale=5.0), 60, 15
    else:  # the tiny LM is slow on a busy CPU: fewer steps
        env = MegaFocusEnv(
            oracle="lm",
            lm="tiny",
            gister="mean",
            block_size=4,
            max_level=2,
            w_max=20,
            step_tokens=4,
            horizon=8,
            tail_tokens=8,
            n_tail_gists=3,
            doc_blocks=20,
            score_scale=5.0,
        )
        n_steps, min_moved = 8, 2
    captured: list[tuple[int, float]] = []  # (T, oracle NLL) of the context about to ingest
    ingest = MegaContextTree.ingest

    def capturing_ingest(tree, token_ids, embeddings):
        ep = env.episode
        if ep is not None and tree is ep.tree and ep.wc.n_tokens > 0:  # not the reset's warm-up
            captured.append(
                (ep.wc.n_tokens, _oracle_nll(env, ep.wc.levels, ep.wc.indices, ep.wc.n_tokens))
            )
        return ingest(tree, token_ids, embeddings)

    monkeypatch.setattr(MegaContextTree, "ingest", capturing_ingest)
    env.reset(seed=3)
    rng = np.random.default_rng(3)
    n_moved = 0
    for _ in range(n_steps):
        ep = env.episode
        seen = ep.wc.copy()  # the context the agent scores
        n_before = len(captured)
        act = np.clip(rng.normal(scale=1.0, size=env.n_slots), -1, 1).astype(np.float32)
        _, reward, terminated, truncated, info = env.step(act)
        if (
            len(captured) == n_before
        ):  # no ingest after the refocus: the context now is the refocused one
            t, nll = ep.wc.n_tokens, _oracle_nll(env, ep.wc.levels, ep.wc.indices, ep.wc.n_tokens)
        else:
            assert len(captured) == n_before + 1, "one ingest per step"
            t, nll = captured[-1]
        assert t == seen.n_tokens, "the reward's query starts at the cursor the agent saw"
        assert reward == pytest.approx(-nll, rel=1e-6, abs=1e-6)
        assert info["nll"] == pytest.approx(-reward, rel=1e-6, abs=1e-6)
        # how often the refocus changed the score: the check above tells the refocused context from
        # the seen one
        seen_nll = _oracle_nll(env, seen.levels, seen.indices, seen.n_tokens, over_budget=True)
        n_moved += not np.isclose(nll, seen_nll)
        if terminated or truncated:
            env.reset()
    assert n_moved >= min_moved, n_moved


def test_bad_actions_raise_clear_errors():
    env = MegaFocusEnv(**SMALL)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(SMALL["w_max"], dtype=np.float32))  # w_max is not the action's size
    bad = np.zeros(env.n_slots, dtype=np.float32)
    bad[0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        env.step(bad)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        env.step(np.full(env.n_slots, 1.5, dtype=np.float32))
    with pytest.raises(RuntimeError, match="reset"):
        MegaFocusEnv(**SMALL).step(np.zeros(env.n_slots, dtype=np.float32))


def test_render_modes():
    env = MegaFocusEnv(**SMALL, render_mode="ansi")
    env.reset(seed=0)
    env.step(np.full(env.n_slots, 1.0, dtype=np.float32))
    text = env.render()
    assert text.startswith("T=") and "slots=" in text
    env = MegaFocusEnv(**SMALL, render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    assert img.dtype == np.uint8 and img.shape == (24, 4 * env.n_slots, 3) and img.any()
    with pytest.raises(ValueError, match="render_mode"):
        MegaFocusEnv(**SMALL, render_mode="human")


def test_lm_oracle_variant_runs_with_tiny_lm():
    small = {k: v for k, v in SMALL.items() if k != "d_model"}  # the LM brings its width
    env = MegaFocusEnv(oracle="lm", lm="tiny", **{**small, "doc_blocks": 20})
    obs, _ = env.reset(seed=0)
    assert obs["embeddings"].shape == (env.n_slots, 64)
    for _ in range(5):
        obs, reward, terminated, _, info = env.step(np.full(env.n_slots, 1.0, dtype=np.float32))
        assert np.isfinite(reward) and np.isfinite(info["recency_nll"])


# ------------------------------------------------------------------ policies acting through the env
def test_observation_holds_the_context_arrays():
    """``observed_arrays`` rebuilds, from the observation alone, exactly the ``ContextArrays`` the
    env's working context gives LensNet (every field, every step, over-budget contexts included)."""
    env = MegaFocusEnv(**SMALL, score_scale=5.0)
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(5)
    n_over = 0
    for _ in range(30):
        assert env.observation_space.contains(obs)
        seen = observed_arrays(obs)
        truth = env.episode.arrays()
        for f in dataclasses.fields(ContextArrays):
            a, b = getattr(seen, f.name), getattr(truth, f.name)
            assert np.asarray(a).dtype == np.asarray(b).dtype, f.name
            np.testing.assert_array_equal(a, b, err_msg=f.name)
        n_over += len(env.episode.wc) > SMALL["w_max"]
        act = np.clip(rng.normal(size=env.n_slots), -1, 1).astype(np.float32)
        obs, *_ = env.step(act)
    assert n_over > 10  # the agent really scored over-budget contexts


def _env_document_episode(world, doc: int, seed: int) -> Episode:
    """``sim.streamworld.world``'s episode over the document
    ``MegaFocusEnv(**SMALL).reset(seed=doc)`` draws."""
    src = MegaFocusEnv(**SMALL)
    src.reset(seed=doc)
    ep = src.episode
    assert world == src.world
    return Episode(world, ep.token_ids, ep.embeddings, ep.oracle)


def _tiny_lensnet():
    """A small random stream LensNet whose scores move the focus."""
    import torch

    from lensnet.model import LensNet, LensNetConfig

    torch.manual_seed(0)
    cfg = LensNetConfig.tiny(SMALL["d_model"], block_size=SMALL["block_size"], max_level=2)
    model = LensNet(cfg).eval()
    with torch.no_grad():  # its read-outs start at zero (all scores 0): perturb every weight
        for w in model.parameters():
            w.add_(0.3 * torch.randn_like(w))
    return model


def _policy(name: str, model):
    from sim.policies import RandomScores

    if name == "random":  # the same stream of draws on both paths
        return RandomScores(rng=np.random.default_rng(11))
    return build_policy(name, PolicyContext(seed=0, lensnet=model), world="stream")


DOCS = (101, 202)
ENV_POLICIES = ("recency", "random", "cue", "lensnet", "lensnet_rank", "oracle")


@pytest.mark.parametrize("name", ENV_POLICIES)
def test_policy_through_the_env_matches_sim_run(name):
    """The same documents through (a) ``sim.streamworld.world.evaluate_policy`` (``sim.run``'s
    stream evaluation) and (b) the env, the policy acting through ``PolicyAgent`` on observations
    only (the privileged oracle and cue through ``env.unwrapped``): the same NLL at every step,
    1e-6."""
    model = _tiny_lensnet() if name.startswith("lensnet") else None
    env = MegaFocusEnv(**SMALL, score_scale=8.0)  # a power of two: the scores pass exactly
    sim_nll: list[float] = []
    evaluate_policy(
        _policy(name, model),
        env.world,
        DOCS,
        seed=0,
        progress=False,
        episode_factory=_env_document_episode,
        on_step=lambda _name, ep, _actions: sim_nll.append(ep.nll()),
    )
    agent = PolicyAgent(_policy(name, model), env=env)
    env_nll, recency_nll = [], []
    for doc in DOCS:
        obs, _ = env.reset(seed=doc)
        terminated = False
        while not terminated:
            action = agent.act(obs)
            obs, reward, terminated, truncated, info = env.step(action)
            env_nll.append(info["nll"])
            recency_nll.append(info["recency_nll"])
            assert reward == -info["nll"] and not truncated
    assert len(env_nll) == len(sim_nll) > 50
    np.testing.assert_allclose(env_nll, sim_nll, rtol=0, atol=1e-6)
    moved = np.abs(np.asarray(env_nll) - np.asarray(recency_nll)) > 1e-6
    assert moved.any() == (name != "recency"), "only recency never leaves the recency path"


def test_every_stream_policy_is_covered_or_refused():
    """Every registered stream policy either is in the equality test above or is refused with a
    clear error (``all_coarse`` acts on the episode itself, not through one score vector)."""
    refused = set(policy_names("stream")) - set(ENV_POLICIES)
    assert refused == {"all_coarse"}
    for name in refused:
        with pytest.raises(TypeError, match="score vector"):
            PolicyAgent(REGISTRY[name]())
    with pytest.raises(ConfigError, match="env="):
        PolicyAgent(REGISTRY["cue"]())  # privileged: needs the env


def test_policy_agent_refuses_scores_it_would_clip():
    env = MegaFocusEnv(**SMALL)  # score_scale 1: Gaussian scores overflow it
    obs, _ = env.reset(seed=0)
    agent = PolicyAgent(_policy("random", None), env=env)
    with pytest.raises(ValueError, match="score_scale"):
        for _ in range(5):
            obs, *_ = env.step(agent.act(obs))
    clipped = PolicyAgent(_policy("random", None), env=env, clip=True).act(obs)
    assert clipped.shape == (env.n_slots,) and np.abs(clipped).max() == 1.0


def test_observed_context_is_what_policies_read():
    """The observed context answers what stream policies read, the same as the working context."""
    env = MegaFocusEnv(**SMALL)
    obs, _ = env.reset(seed=1)
    for _ in range(20):
        obs, *_ = env.step(np.full(env.n_slots, 0.5, dtype=np.float32))
    wc, seen = env.episode.wc, ObservedContext(obs)
    assert len(seen) == len(wc) and seen.n_tokens == wc.n_tokens
    for k in ("levels", "indices", "starts", "widths", "ends"):
        np.testing.assert_array_equal(getattr(seen, k), getattr(wc, k), err_msg=k)
    with pytest.raises(ValueError, match="tail gists"):
        seen.arrays(SMALL["n_tail_gists"] + 1)


# ---------------------------------------------------------------------------------- vector envs
def _vector_rollout(venv, n_steps: int) -> tuple[np.ndarray, dict]:
    """Rewards (n_steps, n_envs) of recency actions from the batched observations."""
    agent = PolicyAgent(REGISTRY["recency"]())
    obs, _ = venv.reset(seed=[7, 8])
    rewards = []
    for _ in range(n_steps):
        batch = [{k: v[i] for k, v in obs.items()} for i in range(venv.num_envs)]
        actions = np.stack([agent.act(o) for o in batch]).astype(np.float32)
        obs, reward, terminated, truncated, _ = venv.step(actions)
        assert not (terminated.any() or truncated.any())
        rewards.append(reward)
    return np.asarray(rewards), obs


def _single_rewards(seed: int, n_steps: int) -> np.ndarray:
    env, agent = MegaFocusEnv(**SMALL), PolicyAgent(REGISTRY["recency"]())
    obs, _ = env.reset(seed=seed)
    out = []
    for _ in range(n_steps):
        obs, reward, *_ = env.step(agent.act(obs).astype(np.float32))
        out.append(reward)
    return np.asarray(out)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs_step_batched_actions(mode):
    """Two envs stepped with batched actions (``SyncVectorEnv``; ``AsyncVectorEnv`` in forked
    processes): batched spaces, and each env's rewards equal a single env's on its seed."""
    n_steps = 20
    make = functools.partial(MegaFocusEnv, **SMALL)
    if mode == "sync":
        venv = gymnasium.vector.SyncVectorEnv([make, make])
    else:
        venv = gymnasium.vector.AsyncVectorEnv([make, make], context="fork")
    try:
        rewards, obs = _vector_rollout(venv, n_steps)
        assert venv.observation_space.contains(obs)
        assert obs["embeddings"].shape == (2, venv.single_action_space.shape[0], SMALL["d_model"])
        assert obs["n_tokens"].shape == (2,)
    finally:
        venv.close()
    expected = np.stack([_single_rewards(7, n_steps), _single_rewards(8, n_steps)], axis=1)
    np.testing.assert_array_equal(rewards, expected)
    assert not np.array_equal(rewards[:, 0], rewards[:, 1])  # two different documents
