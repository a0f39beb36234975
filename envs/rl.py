"""A reinforcement-learning agent in MegaFocus-v0: PPO with an actor that scores entries the way
LensNet does.

    python -m envs.rl [--total-steps 60000] [--seed 0] [--out runs/rl]
    python -m envs.rl --action scores --lr 3e-4 --init RUN/lensnet.pt   # starts as LensNet

The agent acts through the gymnasium API (``envs.megafocus_env.MegaFocusEnv`` on the synthetic
world, ``sim.run``'s default sizes). Its actor is one small network applied to every entry of the
working context (an entry's embedding, level, span, distance to the cursor, legal directions and
slot costs), read against the context's tail gists, so it is permutation-equivariant and runs at
any W_max; a Gaussian over each entry that has a legal action (expand or collapse) gives the
action, the env's [-1, 1] scores (x ``score_scale``) that the focus allocator applies. The critic
pools the same per-entry states. ``--init CKPT`` starts the actor from a supervised LensNet
checkpoint (``sim.run``'s ``lensnet.pt``): its mean is LensNet's calibrated score plus a residual
that starts at zero, so step 0 acts as LensNet does and PPO fine-tunes LensNet's own weights.

PPO is CleanRL's single-file pattern (clipped surrogate, GAE, value clipping off, advantage
normalisation, several epochs of minibatches over each rollout), written here for an action space
whose size changes with the context: see docs/rl.md for why not Stable-Baselines3. The reward the
agent learns from is the env's ``recency_nll - nll`` (the recency shadow's NLL minus its own on the
next H tokens): the shadow does not depend on the agent's actions, so this shift leaves the
optimal policy unchanged and removes the documents' own difficulty from the return.

Writes to ``--out``: ``curve.jsonl`` (one line per update: steps, mean episode return, losses,
the held-out NGR every ``--eval-every`` updates), ``agent.pt``, ``results.json`` (the agent beside
recency, random, cue, the oracle and, with ``--init``, the supervised LensNet, on the same
held-out documents: NLL and NGR with a bootstrap interval over documents), ``command.txt`` and
``curve.png``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from envs.megafocus_env import MegaFocusEnv
from envs.policy_agent import observed_arrays
from megacontext.allocator import recency_scores_of
from megacontext.cli import run_cli, to_argv
from megacontext.tree import ConfigError
from megacontext.working_context import ContextArrays
from sim.policy import FocusPolicy, FocusView
from sim.streamworld.world import (
    HELD_OUT_FIRST_DOC,
    WorldConfig,
    evaluate_policy,
    nll_gap_recovered,
)


@dataclass
class RLArgs:
    """Train a PPO agent in MegaFocus-v0 (synthetic world) and compare it with the stream
    policies on held-out documents."""

    out: str = "runs/rl"
    """Run directory (created; its files are overwritten)."""
    seed: int = 0
    """Seed of the agent's initialisation, its action noise and its training documents."""
    total_steps: int = 60_000
    """Environment steps of training (all envs together)."""
    n_envs: int = 4
    """Environments stepped side by side (one process)."""
    rollout_steps: int = 64
    """Steps per environment between updates."""
    epochs: int = 4
    """Passes over each rollout."""
    minibatches: int = 4
    """Minibatches per pass."""
    lr: float = 2e-3
    """Adam learning rate (annealed linearly to 0): 2e-3 for the pointer (at 3e-4 it has not left
    'none' after 16k steps, results/rl-probe-seed0); the LensNet-initialised scores take 3e-4."""
    gamma: float = 0.95
    """Discount: a focus choice pays off within a few steps (H = 64 tokens = 2 steps ahead)."""
    gae_lambda: float = 0.9
    """GAE lambda."""
    clip: float = 0.2
    """PPO's ratio clip."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (the Gaussian's log-std is learnt)."""
    max_grad_norm: float = 0.5
    """Gradient clipping."""
    init_log_std: float = -1.0
    """Initial log standard deviation of each entry's score (in action units, [-1, 1])."""
    hidden: int = 64
    """Width of the per-entry network."""
    init: str = ""
    """'' (from scratch) or a supervised LensNet checkpoint of the same world (sim.run's
    lensnet.pt) the actor starts from."""
    eval_docs: int = 8
    """Held-out documents of the final comparison (ids from 1 000 000, sim.run's)."""
    eval_every: int = 0
    """Held-out NGR of the agent every this many updates (0: only at the end); it uses the first
    two held-out documents."""
    w_max: int = 256
    """Working-context slots."""
    score_scale: float = 1.0
    """Nats per action unit (the env's ``score_scale``)."""
    action: str = "pointer"
    """'pointer': one categorical choice a step among the context's gists and 'none', the chosen
    gist scored +1 over the recency scores the allocator restores with (exploration changes one
    decision at a time); 'scores': a Gaussian score per actionable entry (the env's own action;
    from scratch it does not learn in 16k steps, results/rl-probe-seed0; with --init)."""
    progress: bool = True
    """Progress bar."""


def world_env(args: RLArgs) -> MegaFocusEnv:
    """The env at ``sim.run``'s default synthetic world (and ``args``' W_max and score scale)."""
    w = WorldConfig()
    return MegaFocusEnv(
        w_max=args.w_max,
        block_size=w.tree.block_size,
        max_level=w.tree.max_level,
        step_tokens=w.step_tokens,
        horizon=w.horizon,
        tail_tokens=w.context.tail_tokens,
        n_tail_gists=w.n_tail_gists,
        doc_blocks=w.synthetic.n_blocks,
        d_model=w.tree.d_model,
        score_scale=args.score_scale,
    )


# ---------------------------------------------------------------------------------- the actor


def entry_inputs(a: ContextArrays, block_size: int, max_level: int) -> np.ndarray:
    """(N, max_level + 9) what the actor reads of each entry besides its embedding: its level
    (one-hot), span width and distance to the cursor (log, scaled), slot (fraction of the context),
    legal directions, and the slot costs of its expand and of its group's collapse."""
    n, b = len(a.levels), block_size
    level = np.eye(max_level + 1, dtype=np.float32)[a.levels]
    scale = np.log1p(float(b**max_level))
    cols = [
        np.log1p(a.span_width) / scale,
        np.log1p(a.distance_to_cursor) / np.log1p(max(a.n_tokens, 1)),
        np.arange(n) / max(n, 1),
        a.can_expand,
        a.can_collapse,
        a.expand_cost / max(b - 1, 1),
        a.collapse_refund * b / max(b - 1, 1),
        np.full(n, np.log1p(a.n_tokens) / 10.0),
    ]
    return np.concatenate([level, np.stack(cols, 1).astype(np.float32)], 1)


def actionable(a: ContextArrays) -> np.ndarray:
    """(N,) bool: entries whose score can change what the allocator does (a legal expand or a
    collapsible group); the others get score 0 and no noise."""
    return np.asarray(a.can_expand, bool) | np.asarray(a.can_collapse, bool)


def to_batch(arrays: list[ContextArrays], block_size: int, max_level: int) -> dict:
    """The actor's padded batch of contexts."""
    n = max(len(a.levels) for a in arrays)
    t = max(a.tail_gists.shape[0] for a in arrays)
    d = arrays[0].embeddings.shape[1]
    f = max_level + 9
    out = {
        "emb": torch.zeros(len(arrays), n, d),
        "x": torch.zeros(len(arrays), n, f),
        "valid": torch.zeros(len(arrays), n, dtype=torch.bool),
        "act": torch.zeros(len(arrays), n, dtype=torch.bool),
        "expand": torch.zeros(len(arrays), n, dtype=torch.bool),
        "tail": torch.zeros(len(arrays), t, d),
        "tail_mask": torch.zeros(len(arrays), t, dtype=torch.bool),
    }
    for i, a in enumerate(arrays):
        k = len(a.levels)
        out["emb"][i, :k] = torch.as_tensor(a.embeddings, dtype=torch.float32)
        out["x"][i, :k] = torch.as_tensor(entry_inputs(a, block_size, max_level))
        out["valid"][i, :k] = True
        out["act"][i, :k] = torch.as_tensor(actionable(a))
        out["expand"][i, :k] = torch.as_tensor(np.asarray(a.can_expand, bool))
        out["tail"][i, : a.tail_gists.shape[0]] = torch.as_tensor(a.tail_gists,
                                                                  dtype=torch.float32)
        out["tail_mask"][i, : a.tail_gists.shape[0]] = torch.as_tensor(a.tail_mask, dtype=bool)
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.float().unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class EntryActorCritic(nn.Module):
    """One network over every entry (permutation-equivariant, any W_max): an entry's state is its
    embedding and inputs read against the mean of the context's tail gists; the actor's mean
    score comes from it, the critic's value from its pool over the context. With ``lensnet`` the
    mean is LensNet's calibrated score / ``score_scale`` plus this network's, whose read-out then
    starts at zero."""

    def __init__(self, d_model: int, n_inputs: int, hidden: int = 64, init_log_std: float = -1.0,
                 lensnet: nn.Module | None = None, score_scale: float = 1.0) -> None:
        super().__init__()
        self.emb, self.inputs = nn.Linear(d_model, hidden), nn.Linear(n_inputs, hidden)
        self.tail = nn.Linear(d_model, hidden)
        self.body = nn.Sequential(nn.Tanh(), nn.Linear(3 * hidden, hidden), nn.Tanh(),
                                  nn.Linear(hidden, hidden), nn.Tanh())
        self.mean_head = nn.Linear(hidden, 1)
        self.value_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(),
                                        nn.Linear(hidden, 1))
        self.log_std = nn.Parameter(torch.tensor(float(init_log_std)))
        self.noop_head = nn.Linear(2 * hidden, 1)  # the pointer's 'none' logit
        self.lensnet, self.score_scale = lensnet, float(score_scale)
        with torch.no_grad():
            self.mean_head.weight.mul_(0.0 if lensnet is not None else 0.01)
            self.mean_head.bias.zero_()
            self.noop_head.weight.zero_()
            self.noop_head.bias.fill_(2.0)  # the pointer starts near recency ('none' ~ half)

    def forward(self, batch: dict, arrays: list[ContextArrays] | None = None):
        """(mean (B, N) on actionable entries, 0 elsewhere; value (B,); the pointer's 'none'
        logit (B,))."""
        t = _masked_mean(self.tail(batch["tail"]), batch["tail_mask"])
        e = self.emb(batch["emb"]) + self.inputs(batch["x"])
        tt = t.unsqueeze(1).expand_as(e)
        z = self.body(torch.cat([e, tt, torch.tanh(e) * torch.tanh(tt)], -1))
        mean = self.mean_head(z).squeeze(-1)
        if self.lensnet is not None:
            mean = mean + self.lensnet_scores(arrays, mean.shape[1]) / self.score_scale
        mean = torch.where(batch["act"], mean, torch.zeros_like(mean))
        pooled = torch.cat([_masked_mean(z, batch["valid"]), t], -1)
        return mean, self.value_head(pooled).squeeze(-1), self.noop_head(pooled).squeeze(-1)

    def lensnet_scores(self, arrays: list[ContextArrays] | None, n: int) -> torch.Tensor:
        from lensnet.data import arrays_to_item, collate

        if arrays is None:
            raise ValueError("a LensNet-initialised actor needs the contexts' arrays")
        u = self.lensnet.score(collate([arrays_to_item(a) for a in arrays]))
        out = torch.zeros(len(arrays), n)
        out[:, : u.shape[1]] = u[:, :n].float()
        return out


class ActorPolicy(FocusPolicy):
    """The trained actor as a ``sim`` stream policy, acting on its most likely action (scores:
    its mean, clipped to the action space; pointer: its likeliest choice), x ``score_scale``, so
    ``sim.streamworld.world.evaluate_policy`` compares it with every other policy on ``sim.run``'s
    held-out documents."""

    worlds = ("stream",)

    def __init__(self, model: EntryActorCritic, block_size: int, max_level: int,
                 score_scale: float, name: str = "ppo", action: str = "scores") -> None:
        self.model, self.b, self.max_level = model.eval(), block_size, max_level
        self.score_scale, self.name, self.action = score_scale, name, action  # type: ignore[misc]

    @torch.no_grad()
    def scores(self, view: FocusView) -> np.ndarray:
        a = view.wc.arrays(view.n_tail_gists)
        batch = to_batch([a], self.b, self.max_level)
        mean, _, noop = self.model(batch, [a])
        if self.action == "scores":
            return np.clip(mean[0].double().numpy(), -1.0, 1.0) * self.score_scale
        k = int(pointer_logits(mean, noop, batch)[0].argmax())
        return pointer_action(a, k if k < len(a.levels) else -1) * self.score_scale


def recency_action(a: ContextArrays) -> np.ndarray:
    """(N,) the recency policy's scores (``megacontext.allocator.recency_scores``) from arrays,
    all in (-1, 0)."""
    return recency_scores_of(a.n_tokens, a.span_start + a.span_width)


def pointer_action(a: ContextArrays, choice: int) -> np.ndarray:
    """(N,) the pointer's action in env units: the recency scores, and +1 on the chosen gist
    (``choice`` -1: none), which then expands if the allocator can pay for it."""
    u = recency_action(a)
    if choice >= 0:
        u[choice] = 1.0
    return u


def pointer_logits(mean: torch.Tensor, noop: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, N + 1) the pointer's logits: each gist's score, then 'none'."""
    logits = torch.where(batch["expand"], mean, torch.full_like(mean, -1e9))
    return torch.cat([logits, noop.unsqueeze(1)], 1)


# -------------------------------------------------------------------------------------- PPO


def _gaussian_logp(mean: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor,
                   act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``u`` summed over actionable entries, and the entropy per entry."""
    std = log_std.exp()
    lp = -0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
    ent = (0.5 + 0.5 * np.log(2 * np.pi) + log_std) * torch.ones_like(mean)
    return (lp * act).sum(1), (ent * act).sum(1) / act.sum(1).clamp(min=1)


def sample_actions(action: str, model: EntryActorCritic, batch: dict, arrays):
    """(samples, log-probabilities (B,), values (B,)): scores, (B, N) Gaussian draws on the
    actionable entries; pointer, (B,) the chosen entry (-1: none)."""
    mean, value, noop = model(batch, arrays)
    if action == "scores":
        noise = torch.randn_like(mean) * model.log_std.exp()
        u = torch.where(batch["act"], mean + noise, torch.zeros_like(mean))
        return u, _gaussian_logp(mean, model.log_std, u, batch["act"])[0], value
    dist = torch.distributions.Categorical(logits=pointer_logits(mean, noop, batch))
    k = dist.sample()
    return torch.where(k == mean.shape[1], -1, k), dist.log_prob(k), value


def evaluate_actions(action: str, model: EntryActorCritic, batch: dict, arrays, samples: list):
    """(log-probabilities, entropies, values) of stored ``samples`` (one per context) under the
    current model."""
    mean, value, noop = model(batch, arrays)
    n = mean.shape[1]
    if action == "scores":
        u = torch.stack([torch.nn.functional.pad(x, (0, n - x.shape[0]))[:n] for x in samples])
        logp, ent = _gaussian_logp(mean, model.log_std, u, batch["act"])
        return logp, ent, value
    k = torch.stack([torch.where(x < 0, n, x) for x in samples])
    dist = torch.distributions.Categorical(logits=pointer_logits(mean, noop, batch))
    return dist.log_prob(k), dist.entropy(), value


def env_action(action: str, sample: torch.Tensor, a: ContextArrays, n_slots: int) -> np.ndarray:
    """The env's action (n_slots,) for one context's ``sample``."""
    k = len(a.levels)
    out = np.zeros(n_slots)
    if action == "scores":
        out[:k] = np.clip(sample[:k].numpy(), -1.0, 1.0)
    else:
        out[:k] = pointer_action(a, int(sample))
    return out


def load_lensnet(path: str, world: WorldConfig) -> nn.Module:
    """A supervised stream LensNet for ``world`` (its d_model, block size and top level)."""
    from lensnet.train import load_model

    model = load_model(path)
    c = model.config
    if (c.d_model, c.block_size, c.max_level) != (
        world.tree.d_model, world.tree.block_size, world.tree.max_level
    ):
        raise ConfigError(
            f"--init {path}: a LensNet for d_model {c.d_model}, block {c.block_size}, top level "
            f"{c.max_level}; this world has {world.tree.d_model}, {world.tree.block_size}, "
            f"{world.tree.max_level}"
        )
    if c.n_entry_features or c.n_query_tokens:
        raise ConfigError(f"--init {path}: a task-world LensNet; the env is a stream world")
    return model


def train(args: RLArgs, log=None) -> tuple[EntryActorCritic, list[dict]]:
    """PPO for ``args.total_steps`` env steps; returns the model and the curve (one row per
    update). ``log(row)`` is called after each update."""
    _check_ppo_args(args)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 7])
    envs = [world_env(args) for _ in range(args.n_envs)]
    world = envs[0].world
    lensnet = load_lensnet(args.init, world) if args.init else None
    model = EntryActorCritic(world.tree.d_model, world.tree.max_level + 9, args.hidden,
                             args.init_log_std, lensnet, args.score_scale).eval()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, eps=1e-5)
    # training documents: the envs' own draws from (seed, env); held-out ids are sim.run's
    state = _EnvState([observed_arrays(e.reset(seed=int(rng.integers(2**31)))[0]) for e in envs],
                      np.zeros(args.n_envs))
    n_updates = args.total_steps // (args.n_envs * args.rollout_steps)
    curve: list[dict] = []
    curve_baselines: dict | None = None  # recency and the oracle on the curve's documents
    bar = tqdm(total=n_updates * args.n_envs * args.rollout_steps, desc="ppo",
               disable=not args.progress)
    for update in range(n_updates):
        for g in opt.param_groups:
            g["lr"] = args.lr * (1.0 - update / n_updates)
        roll = _rollout(args, model, envs, state, rng, bar)
        stats = _ppo_update(args, model, opt, roll, rng)
        row = {"update": update + 1, "steps": (update + 1) * args.n_envs * args.rollout_steps,
               "episode_return": float(np.mean(roll.finished)) if roll.finished else None,
               "episodes": len(roll.finished), "reward_per_step": float(torch.stack(roll.r).mean()),
               "log_std": float(model.log_std.detach()), **stats}
        if args.eval_every and (update + 1) % args.eval_every == 0:
            if curve_baselines is None:
                curve_baselines = compare({}, world, CURVE_DOCS, args.seed)["results"]
            row["heldout_ngr"] = quick_ngr(model, world, args, curve_baselines)
        curve.append(row)
        if log is not None:
            log(row)
    bar.close()
    return model.eval(), curve


def _check_ppo_args(args: RLArgs) -> None:
    """A ``ConfigError`` naming what cannot run: sizes, the action kind, --init with a pointer."""
    per_update = args.n_envs * args.rollout_steps
    if args.total_steps < per_update or min(
        args.n_envs, args.rollout_steps, args.epochs, args.minibatches) < 1 or (
        args.minibatches > per_update
    ):
        raise ConfigError(
            "need n_envs, rollout_steps, epochs >= 1, 1 <= minibatches <= n_envs x rollout_steps "
            f"and total_steps >= n_envs x rollout_steps ({per_update}); got total_steps "
            f"{args.total_steps}, minibatches {args.minibatches}"
        )
    if args.action not in ("scores", "pointer"):
        raise ConfigError(f"action must be 'scores' or 'pointer', got {args.action!r}")
    if args.action == "pointer" and args.init:
        raise ConfigError("--init starts the 'scores' actor from LensNet (--action scores --lr "
                          "3e-4); the pointer learns alone")


@dataclass
class _EnvState:
    """What carries over between rollouts: each env's observation and its episode's return."""

    obs_arrays: list
    ep_return: np.ndarray


@dataclass
class _Rollout:
    """One rollout: per step the observations, actions, log-probabilities, values, rewards and
    episode ends; the advantages and returns (GAE); the returns of the episodes it finished."""

    arrays: list = field(default_factory=list)
    u: list = field(default_factory=list)
    logp: list = field(default_factory=list)
    v: list = field(default_factory=list)
    r: list = field(default_factory=list)
    done: list = field(default_factory=list)
    finished: list = field(default_factory=list)
    adv: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    sizes: tuple[int, int] = (32, 2)
    """(block size, top level) of the world's tree: what ``to_batch`` needs."""


def _rollout(args: RLArgs, model: EntryActorCritic, envs: list, state: _EnvState, rng,
             bar) -> _Rollout:
    """``args.rollout_steps`` steps of every env (a finished episode restarts on a new document),
    then the advantages by GAE(gamma, lambda) against the model's values."""
    world = envs[0].world
    b, top = world.tree.block_size, world.tree.max_level
    roll = _Rollout(sizes=(b, top))
    for _ in range(args.rollout_steps):
        batch = to_batch(state.obs_arrays, b, top)
        with torch.no_grad():
            u, logp, value = sample_actions(args.action, model, batch, state.obs_arrays)
        rewards, dones, nxt = np.zeros(args.n_envs), np.zeros(args.n_envs), []
        for i, env in enumerate(envs):
            action = env_action(args.action, u[i], state.obs_arrays[i], env.n_slots)
            obs, _, terminated, truncated, info = env.step(action)
            rewards[i] = info["recency_nll"] - info["nll"]
            state.ep_return[i] += rewards[i]
            if terminated or truncated:
                roll.finished.append(float(state.ep_return[i]))
                state.ep_return[i] = 0.0
                dones[i] = 1.0
                obs, _ = env.reset(seed=int(rng.integers(2**31)))
            nxt.append(observed_arrays(obs))
        roll.arrays.append(state.obs_arrays)
        roll.u.append(u)
        roll.logp.append(logp)
        roll.v.append(value)
        roll.r.append(torch.as_tensor(rewards, dtype=torch.float32))
        roll.done.append(torch.as_tensor(dones, dtype=torch.float32))
        state.obs_arrays = nxt
        bar.update(args.n_envs)
    with torch.no_grad():
        _, last_v, _ = model(to_batch(state.obs_arrays, b, top), state.obs_arrays)
    roll.adv = torch.zeros(args.rollout_steps, args.n_envs)
    gae = torch.zeros(args.n_envs)
    for t in reversed(range(args.rollout_steps)):
        nv = last_v if t == args.rollout_steps - 1 else roll.v[t + 1]
        live = 1.0 - roll.done[t]
        delta = roll.r[t] + args.gamma * nv * live - roll.v[t]
        gae = delta + args.gamma * args.gae_lambda * live * gae
        roll.adv[t] = gae
    roll.returns = roll.adv + torch.stack(roll.v)
    return roll


def _ppo_update(args: RLArgs, model: EntryActorCritic, opt, roll: _Rollout, rng) -> dict:
    """``args.epochs`` passes of clipped PPO over the rollout in ``args.minibatches`` minibatches;
    the mean policy loss, value loss, approximate KL and clipped fraction."""
    b, top = roll.sizes
    flat = [(t, i) for t in range(args.rollout_steps) for i in range(args.n_envs)]
    # eval mode throughout: the supervised LensNet's dropout would make the update's
    # log-probabilities differ from the rollout's
    stats = {"pg": 0.0, "v": 0.0, "kl": 0.0, "clipfrac": 0.0}
    n_mb = 0
    for _ in range(args.epochs):
        order = rng.permutation(len(flat))
        for part in np.array_split(order, args.minibatches):
            idx = [flat[j] for j in part]
            arrs = [roll.arrays[t][i] for t, i in idx]
            batch = to_batch(arrs, b, top)
            logp, ent, value = evaluate_actions(args.action, model, batch, arrs,
                                                [roll.u[t][i] for t, i in idx])
            old = torch.stack([roll.logp[t][i] for t, i in idx])
            a = torch.stack([roll.adv[t, i] for t, i in idx])
            a = (a - a.mean()) / (a.std() + 1e-8) if len(idx) > 1 else a
            ratio = (logp - old).exp()
            pg = -torch.min(ratio * a, ratio.clamp(1 - args.clip, 1 + args.clip) * a).mean()
            ret = torch.stack([roll.returns[t, i] for t, i in idx])
            v_loss = 0.5 * ((value - ret) ** 2).mean()
            loss = pg + args.vf_coef * v_loss - args.ent_coef * ent.mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            with torch.no_grad():
                stats["pg"] += float(pg)
                stats["v"] += float(v_loss)
                stats["kl"] += float(((ratio - 1) - (logp - old)).mean())
                stats["clipfrac"] += float(((ratio - 1).abs() > args.clip).float().mean())
            n_mb += 1
    return {k: v / n_mb for k, v in stats.items()}


CURVE_DOCS = [HELD_OUT_FIRST_DOC, HELD_OUT_FIRST_DOC + 1]
"""The learning curve's held-out documents."""


def quick_ngr(model: EntryActorCritic, world: WorldConfig, args: RLArgs,
              baselines: dict) -> float | None:
    """The agent's NGR on the learning curve's documents (``baselines``: recency's and the
    oracle's results there, ``compare({}, ...)["results"]``, computed once per run)."""
    res = compare({"ppo": _actor_policy(model, world, args)}, world, CURVE_DOCS, args.seed,
                  baselines)
    return res["ngr"]["ppo"]


def _actor_policy(model: EntryActorCritic, world: WorldConfig, args: RLArgs) -> ActorPolicy:
    return ActorPolicy(model, world.tree.block_size, world.tree.max_level, args.score_scale,
                       action=args.action)


def compare(policies: dict[str, FocusPolicy], world: WorldConfig, docs: list[int],
            seed: int, baselines: dict | None = None) -> dict:
    """``policies`` beside recency and the oracle on ``docs``
    (``sim.streamworld.world.evaluate_policy``): per policy its NLL per document, and NGR
    (``nll_gap_recovered``). ``baselines``: recency's and the oracle's results on the same
    documents, when already evaluated (they do not change)."""
    from sim.policies import build_policy
    from sim.policy import PolicyContext

    if baselines is None:
        ctx = PolicyContext(seed=seed)
        baselines = {n: evaluate_policy(build_policy(n, ctx, world="stream"), world, docs, seed,
                                        progress=False) for n in ("recency", "oracle")}
    results = {**baselines, **{name: evaluate_policy(p, world, docs, seed, progress=False)
                               for name, p in policies.items()}}
    return {"results": results, "ngr": nll_gap_recovered(results)}


def ngr_interval(results: dict, name: str, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of ``name``'s NGR over documents (resampled together for recency,
    the oracle and the policy)."""
    rng = np.random.default_rng(seed)
    rec, orc, pol = (np.asarray(results[k]["nll_per_doc"]) for k in ("recency", "oracle", name))
    idx = rng.integers(0, len(rec), (n_boot, len(rec)))
    gap = rec[idx].mean(1) - orc[idx].mean(1)
    ok = np.abs(gap) > 1e-12
    boot = (rec[idx].mean(1) - pol[idx].mean(1))[ok] / gap[ok]
    return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def run(args: RLArgs) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(
        " ".join(["python -m envs.rl", *map(shlex.quote, to_argv(args))]) + "\n")
    t0 = time.perf_counter()
    with (out / "curve.jsonl").open("w") as f:
        model, curve = train(args, log=lambda row: (f.write(json.dumps(row) + "\n"), f.flush()))
    train_s = time.perf_counter() - t0
    torch.save({"args": asdict(args), "state_dict": model.state_dict()}, out / "agent.pt")
    world = world_env(args).world
    from sim.policies import build_policy
    from sim.policy import PolicyContext

    policies: dict[str, FocusPolicy] = {"ppo": _actor_policy(model, world, args)}
    ctx = PolicyContext(seed=args.seed)
    for name in ("random", "cue"):
        policies[name] = build_policy(name, ctx, world="stream")
    if args.init:
        from sim.policies import LensNetPolicy

        policies["lensnet"] = LensNetPolicy(load_lensnet(args.init, world))
    docs = [HELD_OUT_FIRST_DOC + i for i in range(args.eval_docs)]
    cmp = compare(policies, world, docs, args.seed)
    summary = {
        name: {"nll": r["nll"], "ngr": cmp["ngr"][name],
               "ngr_ci95": ngr_interval(cmp["results"], name) if args.eval_docs > 1 else None,
               "nll_per_doc": r["nll_per_doc"], "expands_per_step": r["expands_per_step"]}
        for name, r in cmp["results"].items()
    }
    results = {"config": asdict(args), "train_seconds": train_s, "eval_docs": docs,
               "policies": summary, "final_update": curve[-1] if curve else None}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot_curve(curve, out / "curve.png")
    except Exception as err:  # a plot never loses the run's numbers
        print(f"warning: no curve.png ({err})", file=sys.stderr)
    return results


def plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pts = [(r["steps"], r["reward_per_step"]) for r in curve]
    ax.plot(*zip(*pts, strict=True), label="reward per step (recency NLL - NLL)")
    ev = [(r["steps"], r["heldout_ngr"]) for r in curve if r.get("heldout_ngr") is not None]
    if ev:
        ax2 = ax.twinx()
        ax2.plot(*zip(*ev, strict=True), "o-", color="C1", label="held-out NGR")
        ax2.set_ylabel("held-out NGR (2 documents)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("nats per step")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args, res = run_cli(RLArgs, run, argv, (ConfigError,))
    print(f"{'policy':10s} {'NLL':>8s} {'NGR':>7s}  95% CI (documents)")
    for name, r in res["policies"].items():
        ci = "" if not r["ngr_ci95"] else f"[{r['ngr_ci95'][0]:.2f}, {r['ngr_ci95'][1]:.2f}]"
        ngr = "   -   " if r["ngr"] is None else f"{r['ngr']:7.3f}"
        print(f"{name:10s} {r['nll']:8.4f} {ngr}  {ci}")
    print(f"run directory: {args.out}")


if __name__ == "__main__":
    main()
