"""MegaFocus-v0's throughput: env steps per second of one env, ``SyncVectorEnv`` and
``AsyncVectorEnv`` (issue "The synthetic world as a research environment", item 2).

    python -m benchmarks.env_throughput [--steps 200] [--n-envs 2] [--seed 0] [--context fork]

The synthetic oracle at the env's default sizes; every env acts with the recency policy through
``envs.policy_agent.PolicyAgent`` (its scores computed from the observation, inside the timed loop).
A vector step counts ``n_envs`` env steps (an autoreset step included); a single env is reset when
its document ends. ``steps_per_s`` counts the whole loop (actions and steps), ``env_steps_per_s``
only the time inside ``step``. The ratios vector / single come from the same run. Writes
``benchmarks/results/env_throughput.json``.
"""

from __future__ import annotations

import argparse
import functools
import time

import gymnasium
import numpy as np

from benchmarks.common import write_results
from envs.megafocus_env import MegaFocusEnv
from envs.policy_agent import PolicyAgent
from sim.policies import Recency

ENV_KWARGS: dict = {"oracle": "synthetic"}  # the env's defaults otherwise
WARMUP_STEPS = 5  # steps before the clock starts (imports, first allocations)


def _single(steps: int, seed: int) -> dict:
    """One env, ``steps`` timed steps."""
    env, agent = MegaFocusEnv(**ENV_KWARGS), PolicyAgent(Recency())
    obs, _ = env.reset(seed=seed)
    in_step, t0 = 0.0, 0.0
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            in_step, t0 = 0.0, time.perf_counter()
        action = agent.act(obs).astype(np.float32)
        s0 = time.perf_counter()
        obs, _, terminated, truncated, _ = env.step(action)
        in_step += time.perf_counter() - s0
        if terminated or truncated:
            obs, _ = env.reset()
    total = time.perf_counter() - t0
    return {
        "steps": steps,
        "seconds": total,
        "steps_per_s": steps / total,
        "env_steps_per_s": steps / in_step,
    }


def _vector(mode: str, steps: int, n_envs: int, seed: int, context: str | None) -> dict:
    """``n_envs`` envs in a ``SyncVectorEnv`` or ``AsyncVectorEnv``; ``steps`` timed steps."""
    make = functools.partial(MegaFocusEnv, **ENV_KWARGS)
    if mode == "sync":
        venv = gymnasium.vector.SyncVectorEnv([make] * n_envs)
    else:
        venv = gymnasium.vector.AsyncVectorEnv([make] * n_envs, context=context)
    agent = PolicyAgent(Recency())
    try:
        obs, _ = venv.reset(seed=[seed + i for i in range(n_envs)])
        in_step, t0 = 0.0, 0.0
        for i in range(WARMUP_STEPS + steps):
            if i == WARMUP_STEPS:
                in_step, t0 = 0.0, time.perf_counter()
            actions = np.stack(
                [agent.act({k: v[j] for k, v in obs.items()}) for j in range(n_envs)]
            ).astype(np.float32)
            s0 = time.perf_counter()
            obs, *_ = venv.step(actions)
            in_step += time.perf_counter() - s0
        total = time.perf_counter() - t0
    finally:
        venv.close()
    n = steps * n_envs
    return {
        "vector_steps": steps,
        "env_steps": n,
        "seconds": total,
        "steps_per_s": n / total,
        "env_steps_per_s": n / in_step,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps (vector steps for vectors)")
    ap.add_argument("--n-envs", type=int, default=2, help="envs in each vector env")
    ap.add_argument("--seed", type=int, default=0, help="reset seed (env i of a vector: seed + i)")
    ap.add_argument("--context", default="fork", help="AsyncVectorEnv's multiprocessing context")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.n_envs < 1:
        ap.error("--steps and --n-envs must be >= 1")
    single = _single(args.steps, args.seed)
    sync = _vector("sync", args.steps, args.n_envs, args.seed, None)
    async_ = _vector("async", args.steps, args.n_envs, args.seed, args.context)
    env = MegaFocusEnv(**ENV_KWARGS)
    config = {
        "steps": args.steps,
        "n_envs": args.n_envs,
        "seed": args.seed,
        "async_context": args.context,
        "warmup_steps": WARMUP_STEPS,
        "policy": "recency",
        "env": {
            **ENV_KWARGS,
            "w_max": env.w_max,
            "n_slots": env.n_slots,
            "d_model": env.d_model,
            "world": repr(env.world),
        },
        "gymnasium": gymnasium.__version__,
    }
    results = {
        "single": single,
        "sync_vector": sync,
        "async_vector": async_,
        "ratio_sync_over_single": sync["steps_per_s"] / single["steps_per_s"],
        "ratio_async_over_single": async_["steps_per_s"] / single["steps_per_s"],
    }
    for name in ("single", "sync_vector", "async_vector"):
        r = results[name]
        print(f"{name:<13} {r['steps_per_s']:9.1f} steps/s  ({r['env_steps_per_s']:9.1f} in step)")
    print(
        f"sync / single {results['ratio_sync_over_single']:.2f}, "
        f"async / single {results['ratio_async_over_single']:.2f}"
    )
    write_results("env_throughput", config, results)
    return results


if __name__ == "__main__":
    main()
