"""MegaFocus-v0: gymnasium's checker, registration, determinism, invariants from observations alone,
and the reward recomputed through the oracle from the refocused context."""

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
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext

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
    obs: dict, *, w_max: int, b: int, max_level: int, tail_tokens: int
) -> None:
    """Every invariant of DESIGN §2 that the observation can show, re-derived from its arrays."""
    valid = obs["valid_mask"].astype(bool)
    n = int(valid.sum())
    assert n <= w_max and np.all(valid[:n]) and not np.any(valid[n:]), (
        "valid entries must be a prefix"
    )  # budget
    lv, start, width = obs["levels"][:n], obs["span_start"][:n], obs["span_width"][:n]
    end = start + width
    t = int(end[-1])
    assert np.all(obs["distance_to_cursor"][:n] == t - end)
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
    for k in ("levels", "span_start", "span_width", "can_expand", "can_collapse"):
        assert not np.any(obs[k][n:]), f"padding of {k} must be zero"


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
        act = rng.uniform(-1, 1, size=SMALL["w_max"]).astype(np.float32)
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
        )
        scale = [0.05, 0.5, 100.0][s % 3]  # mild, strong and saturating scores
        act = np.clip(rng.normal(scale=scale, size=SMALL["w_max"]), -1, 1).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(act)
        assert np.isfinite(reward) and info["slots_used"] <= SMALL["w_max"]
        n_expand += sum(a[0] == "expand" for a in info["actions"])
        n_collapse += info["swap_count"]
        if terminated or truncated:
            obs, _ = env.reset()
    assert n_expand > 100 and n_collapse > 100  # the run really moved the focus


def _oracle_nll(env: MegaFocusEnv, levels: np.ndarray, indices: np.ndarray, n_tokens: int) -> float:
    """The oracle's NLL of the H tokens after ``n_tokens``, with a context rebuilt from its entries.
    """
    ep = env.episode
    wc = WorkingContext(ep.tree, env.world.context)
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
        act = np.clip(rng.normal(scale=1.0, size=env.w_max), -1, 1).astype(np.float32)
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
        n_moved += not np.isclose(nll, _oracle_nll(env, seen.levels, seen.indices, seen.n_tokens))
        if terminated or truncated:
            env.reset()
    assert n_moved >= min_moved, n_moved


def test_bad_actions_raise_clear_errors():
    env = MegaFocusEnv(**SMALL)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, dtype=np.float32))
    bad = np.zeros(SMALL["w_max"], dtype=np.float32)
    bad[0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        env.step(bad)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        env.step(np.full(SMALL["w_max"], 1.5, dtype=np.float32))
    with pytest.raises(RuntimeError, match="reset"):
        MegaFocusEnv(**SMALL).step(np.zeros(SMALL["w_max"], dtype=np.float32))


def test_render_modes():
    env = MegaFocusEnv(**SMALL, render_mode="ansi")
    env.reset(seed=0)
    env.step(np.full(SMALL["w_max"], 1.0, dtype=np.float32))
    text = env.render()
    assert text.startswith("T=") and "slots=" in text
    env = MegaFocusEnv(**SMALL, render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    assert img.dtype == np.uint8 and img.shape == (24, 4 * SMALL["w_max"], 3) and img.any()
    with pytest.raises(ValueError, match="render_mode"):
        MegaFocusEnv(**SMALL, render_mode="human")


def test_lm_oracle_variant_runs_with_tiny_lm():
    env = MegaFocusEnv(
        oracle="lm",
        lm="tiny",
        block_size=4,
        max_level=2,
        w_max=40,
        step_tokens=4,
        horizon=8,
        tail_tokens=8,
        n_tail_gists=3,
        doc_blocks=20,
    )
    obs, _ = env.reset(seed=0)
    assert obs["embeddings"].shape == (40, 64)
    for _ in range(5):
        obs, reward, terminated, _, info = env.step(np.full(40, 1.0, dtype=np.float32))
        assert np.isfinite(reward) and np.isfinite(info["recency_nll"])
