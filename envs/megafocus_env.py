"""MegaFocus-v0: learned context focus as a gymnasium environment (adapts ``sim`` to the gym API).
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from megacontext.allocator import AllocatorConfig
from megacontext.lm import pydoc_token_ids
from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError, TreeConfig, mean_gister
from megacontext.working_context import ContextConfig
from sim.policies import Recency
from sim.streamworld.synthetic import SyntheticConfig, SyntheticOracle, generate_document
from sim.streamworld.world import Episode, WorldConfig

EMB_BOUND = 1e6  # finite bounds (gymnasium warns on infinite ones); embeddings are O(1)
LEVEL_COLOURS = np.array([[253, 231, 37], [33, 145, 140], [68, 1, 84], [0, 0, 0]], dtype=np.uint8)


def observation_space(n: int, t: int, d_model: int, b: int, max_level: int) -> spaces.Dict:
    """The env's observations: ``n`` entry slots (``ContextArrays``' fields, padded, with a valid
    mask), ``t`` tail gists of width ``d_model``, the stream's length; ``b`` bounds the costs."""
    big = np.iinfo(np.int64).max
    return spaces.Dict(
        {
            "embeddings": spaces.Box(-EMB_BOUND, EMB_BOUND, (n, d_model), np.float32),
            "position_ids": spaces.Box(0, big, (n,), np.int64),
            "levels": spaces.Box(0, max_level, (n,), np.int64),
            "node_index": spaces.Box(0, big, (n,), np.int64),
            "span_start": spaces.Box(0, big, (n,), np.int64),
            "span_width": spaces.Box(0, big, (n,), np.int64),
            "distance_to_cursor": spaces.Box(0, big, (n,), np.int64),
            "can_expand": spaces.MultiBinary(n),
            "can_collapse": spaces.MultiBinary(n),
            "group_id": spaces.Box(-1, n - 1, (n,), np.int64),
            "expand_cost": spaces.Box(0.0, float(b - 1), (n,), np.float32),
            "collapse_refund": spaces.Box(0.0, (b - 1) / b, (n,), np.float32),
            "valid_mask": spaces.MultiBinary(n),
            "tail_gists": spaces.Box(-EMB_BOUND, EMB_BOUND, (t, d_model), np.float32),
            "tail_levels": spaces.Box(-1, max_level, (t,), np.int64),
            "tail_mask": spaces.MultiBinary(t),
            "n_tokens": spaces.Box(0, big, (), np.int64),
        }
    )


class MegaFocusEnv(gym.Env):
    """
    ## Description
    A frozen language model reads a fixed-budget *working context* of tokens (L0) and gists (L1 =
    ``block_size`` tokens, L2 = ``block_size**2``). Each step the agent scores every entry of the
    context the cursor has just grown by ``step_tokens`` tokens (it may stand over budget by up to
    that many entries); the focus allocator's one pass (DESIGN §4) restores the ``w_max`` budget
    by collapsing the groups the scores value least, then expands the positive ones, paying with
    collapses. The reward is how well the refocused context predicts the next ``horizon`` tokens.
    The cycle is ``sim.streamworld.world.evaluate_policy``'s, so a ``sim.policies`` stream policy
    acting through the env (``envs.policy_agent.PolicyAgent``) gets the NLL ``sim.run`` reports,
    step for step.

    ## Action Space
    ``Box(-1, 1, (n_slots,), float32)``, ``n_slots = max(w_max + step_tokens, warmup_tokens)``
    (the most entries a context holds right after an ingest): one signed score per entry,
    multiplied by ``score_scale`` (nats) before the allocator sees it (so its ``tau_expand`` = 0.2
    applies to the scaled value); slots past the current context length are ignored. A float64
    action is used as given (no float32 rounding), so scores ``u`` sent as ``u / score_scale``
    reach the allocator exactly when ``score_scale`` is a power of two. The allocator hard-masks
    illegal directions (L0 never expands, the top level and the recency tail never collapse). A
    wrong shape, NaN/inf or a value outside [-1, 1] raises ``ValueError``.

    ## Observation Space
    A ``Dict`` holding everything LensNet and the stream policies read (``ContextArrays``, field
    for field; ``envs.policy_agent.observed_arrays`` rebuilds it), per-entry arrays padded to
    ``n_slots``:

    | key | shape | dtype | bounds | meaning |
    |---|---|---|---|---|
    | embeddings | (n_slots, d_model) | float32 | ±1e6 | node embedding (token or gist) |
    | position_ids | (n_slots,) | int64 | ≥ 0 | position the LM gives the entry (slot index) |
    | levels | (n_slots,) | int64 | [0, max_level] | tree level, 0 on padding |
    | node_index | (n_slots,) | int64 | ≥ 0 | index of the node within its level |
    | span_start | (n_slots,) | int64 | ≥ 0 | first token covered |
    | span_width | (n_slots,) | int64 | ≥ 0 | tokens covered (= block_size**level) |
    | distance_to_cursor | (n_slots,) | int64 | ≥ 0 | n_tokens minus the span end |
    | can_expand | (n_slots,) | int8 | {0, 1} | 1 where the entry is a gist |
    | can_collapse | (n_slots,) | int8 | {0, 1} | 1 where its sibling group can collapse |
    | group_id | (n_slots,) | int64 | [-1, n_slots) | slot of its group's first member, -1 if none |
    | expand_cost | (n_slots,) | float32 | [0, b-1] | c⁺: slots an expand adds (b-1 on gists) |
    | collapse_refund | (n_slots,) | float32 | [0, (b-1)/b] | c⁻: its group's freed slots / b |
    | valid_mask | (n_slots,) | int8 | {0, 1} | 1 on real entries (a prefix) |
    | tail_gists | (n_tail_gists, d_model) | float32 | ±1e6 | top gist(s), recent L1 gists |
    | tail_levels | (n_tail_gists,) | int64 | [-1, max_level] | their levels, -1 on padding |
    | tail_mask | (n_tail_gists,) | int8 | {0, 1} | 1 on real tail gists |
    | n_tokens | () | int64 | ≥ 0 | T: tokens ingested (the cursor) |

    Padding is 0 except ``group_id`` and ``tail_levels`` (-1). The number of valid entries may
    exceed ``w_max`` by up to ``step_tokens`` (the ingest); after the step's refocus it never does
    (``info["slots_used"]``).

    ## Rewards
    ``-NLL``: the oracle's mean next-token negative log-likelihood of the next ``horizon`` tokens
    under the refocused context (``oracle="synthetic"``: the exact synthetic world; ``"lm"``: a
    frozen causal LM). ``info`` holds ``nll``, ``recency_nll`` (the same document under the
    recency policy, for comparison), ``actions`` (kind, level, index), ``slots_used`` (after the
    refocus, ≤ ``w_max``), ``swap_count`` (collapses paid for expands), ``restore_count`` (forced
    collapses restoring the budget after the ingest) and ``n_tokens``.

    ## Starting State
    ``reset`` draws a new document from ``self.np_random`` and ingests ``warmup_tokens`` =
    max(``step_tokens``, 2 ``tail_tokens``); the first action restores the budget if they exceed it.

    ## Step
    The action refocuses the observed context (restore, then expands/swaps: the allocator's one
    pass with one score vector); the reward is measured; the cursor then ingests ``step_tokens``
    and the next observation is that grown context. Restore collapses are forced: they start no
    cooldown, so the agent may re-expand them the next step.

    ## Episode End
    Terminated when fewer than ``horizon`` tokens remain after the cursor (document end).
    Truncated by ``max_episode_steps`` (registered default 1000) through ``TimeLimit``.

    ## Arguments
    ``oracle`` ("synthetic" | "lm"), ``score_scale`` (1.0), ``block_size`` (32), ``max_level`` (2),
    ``w_max`` (256), ``step_tokens`` K (32), ``horizon`` H (64), ``tail_tokens`` R (128),
    ``n_tail_gists`` (6), ``doc_blocks`` (document length in blocks, 96), ``d_model`` (synthetic
    only, 64), ``lm`` ("smollm2", "tiny" or a model folder; for ``oracle="lm"``), ``gister``
    ("auto": the committed GistNet checkpoint when it fits the LM, else mean pooling; "gistnet";
    "mean"; for ``oracle="lm"``), ``render_mode`` ("ansi" | "rgb_array"), ``debug`` (False; True:
    ``check_invariants()`` of both working contexts after every refocus, raising
    ``InvariantViolation`` on the first broken).

    ## Version History
    * v0: initial version (unreleased; the ``gister`` and ``debug`` arguments were added before any
      release). Observation extended with every ``ContextArrays`` field LensNet and the stream
      policies read (``position_ids``, ``node_index``, ``group_id``, ``expand_cost``,
      ``collapse_refund``, ``tail_levels``, ``n_tokens``; none removed), and the step made
      ``sim.run``'s: the agent now scores the context right after the ingest (``n_slots``, was
      ``w_max``) and its one action restores the budget too (before, the budget was restored after
      the ingest with the previous action's scores, carried over by node).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        oracle: str = "synthetic",
        block_size: int = 32,
        max_level: int = 2,
        w_max: int = 256,
        step_tokens: int = 32,
        horizon: int = 64,
        tail_tokens: int = 128,
        n_tail_gists: int = 6,
        doc_blocks: int = 96,
        d_model: int = 64,
        lm: str = "smollm2",
        gister: str = "auto",
        score_scale: float = 1.0,
        render_mode: str | None = None,
        debug: bool = False,
        tail: int | None = None,
        n_tail: int | None = None,
    ) -> None:
        if tail is not None or n_tail is not None:  # the names before tail_tokens / n_tail_gists
            warnings.warn(
                "MegaFocus-v0: 'tail' and 'n_tail' are now 'tail_tokens' and 'n_tail_gists'",
                DeprecationWarning,
                stacklevel=2,
            )
            tail_tokens = tail_tokens if tail is None else tail
            n_tail_gists = n_tail_gists if n_tail is None else n_tail
        self.debug = bool(debug)
        if not (np.isfinite(score_scale) and score_scale > 0):
            raise ConfigError(f"score_scale must be a positive number, got {score_scale}")
        self.score_scale = float(score_scale)
        if oracle not in ("synthetic", "lm"):
            raise ConfigError(f"oracle must be 'synthetic' or 'lm', got {oracle!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(
                f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.oracle_kind, self.render_mode = oracle, render_mode
        self._lm_oracle: LMOracle | None = None
        self._tokenizer = None
        self._gister, self.gister_name = mean_gister, "mean"
        if oracle == "lm":
            from sim.taskworld.world import load_reader

            reader = load_reader(lm, gister, block_size)
            self._lm_oracle, self._tokenizer = reader.oracle, reader.own_tokenizer
            d_model = self._lm_oracle.d_model
            self._gister, self.gister_name = reader.gister, reader.gister_name
        # info per level: the default (1, 0.6, 0.25) up to L2, geometric beyond
        info = (
            SyntheticConfig.info[: max_level + 1]
            if max_level <= 2
            else tuple(0.6 ** np.arange(max_level + 1))
        )
        synth = SyntheticConfig(
            d_model=d_model, block_size=block_size, n_blocks=doc_blocks, info=info
        )
        self.world = WorldConfig(
            env=oracle,
            step_tokens=step_tokens,
            horizon=horizon,
            n_tail_gists=n_tail_gists,
            warmup_tokens=max(step_tokens, 2 * tail_tokens),
            tree=TreeConfig(block_size=block_size, max_level=max_level, d_model=d_model),
            context=ContextConfig(w_max=w_max, tail_tokens=tail_tokens),
            allocator=AllocatorConfig(),
            synthetic=synth,
        )
        self.w_max, self.n_tail_gists, self.d_model = w_max, n_tail_gists, d_model
        # the most entries a context holds right after an ingest (the agent scores that context)
        self.n_slots = n = max(w_max + step_tokens, self.world.warmup_tokens)
        self.observation_space = observation_space(n, n_tail_gists, d_model, block_size, max_level)
        self.action_space = spaces.Box(-1.0, 1.0, (n,), np.float32)
        self.episode: Episode | None = None
        self.shadow: Episode | None = None  # the same document under the recency policy
        self._recency = Recency()

    # ------------------------------------------------------------------------------ episode
    def _document(self) -> tuple[np.ndarray, np.ndarray, Any]:
        rng = np.random.default_rng(int(self.np_random.integers(2**63)))
        n_tokens = self.world.synthetic.n_blocks * self.world.tree.block_size
        if self.oracle_kind == "synthetic":
            doc = generate_document(self.world.synthetic, rng)
            return doc.token_ids, doc.embeddings, SyntheticOracle(doc)
        assert self._lm_oracle is not None
        if (
            self._tokenizer is not None
        ):  # a window of real English (pydoc topics) at a random offset
            ids = pydoc_token_ids(self._tokenizer)
            start = int(rng.integers(0, len(ids) - n_tokens))
            ids = ids[start : start + n_tokens]
        else:  # the tiny test LM has no tokenizer: random ids
            ids = rng.integers(0, self._lm_oracle.embed.num_embeddings, n_tokens)
        return ids, self._lm_oracle.token_embeddings(ids), self._lm_oracle

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        ids, emb, oracle = self._document()
        self.episode = Episode(self.world, ids, emb, oracle, gister=self._gister)
        self.shadow = Episode(self.world, ids, emb, oracle, gister=self._gister)
        self.episode.advance()  # the warm-up; the first action restores the budget
        self.shadow.advance()
        return self._obs(), {
            "n_tokens": self.episode.wc.n_tokens,
            "slots_used": len(self.episode.wc),
        }

    def step(self, action):
        if self.episode is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action)
        if action.shape != (self.n_slots,):
            raise ValueError(f"action must have shape ({self.n_slots},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action must be finite (no NaN or inf)")
        if np.any(np.abs(action) > 1.0 + 1e-6):
            raise ValueError(
                "action values must lie in [-1, 1] (scores are action * score_scale); max |a| = "
                f"{np.abs(action).max()}"
            )
        ep = self.episode
        scores = action[: len(ep.wc)].astype(np.float64) * self.score_scale
        actions = ep.refocus(scores)  # restore the budget with the scores, then expand/swap
        self._recency.apply(self.shadow)
        if self.debug:
            ep.wc.check_invariants()
            self.shadow.wc.check_invariants()
        nll, recency_nll = ep.nll(), self.shadow.nll()
        info = {
            "nll": nll,
            "recency_nll": recency_nll,
            "actions": [(a.kind, a.level, a.index) for a in actions],
            "slots_used": len(ep.wc),
            "swap_count": sum(a.kind == "collapse" and not a.forced for a in actions),
            "restore_count": sum(a.forced for a in actions),
            "n_tokens": ep.wc.n_tokens,
        }
        ep.advance()  # H tokens remained after the cursor, so there is always one to ingest
        self.shadow.advance()
        terminated = not ep.can_query()
        return self._obs(), -nll, terminated, False, info

    # -------------------------------------------------------------------------- observation
    def _obs(self) -> dict[str, np.ndarray]:
        assert self.episode is not None
        a = self.episode.arrays()
        n, w = a.levels.shape[0], self.n_slots
        assert n <= w, f"{n} entries exceed the observation's {w} slots"

        def pad(x, dtype, fill=0):
            out = np.full((w, *x.shape[1:]), fill, dtype=dtype)
            out[:n] = x
            return out

        return {
            "embeddings": pad(a.embeddings, np.float32),
            "position_ids": pad(a.position_ids, np.int64),
            "levels": pad(a.levels, np.int64),
            "node_index": pad(a.node_index, np.int64),
            "span_start": pad(a.span_start, np.int64),
            "span_width": pad(a.span_width, np.int64),
            "distance_to_cursor": pad(a.distance_to_cursor, np.int64),
            "can_expand": pad(a.can_expand, np.int8),
            "can_collapse": pad(a.can_collapse, np.int8),
            "group_id": pad(a.group_id, np.int64, fill=-1),
            "expand_cost": pad(a.expand_cost, np.float32),
            "collapse_refund": pad(a.collapse_refund, np.float32),
            "valid_mask": pad(np.ones(n, dtype=bool), np.int8),
            "tail_gists": a.tail_gists.astype(np.float32),
            "tail_levels": a.tail_levels.astype(np.int64),
            "tail_mask": a.tail_mask.astype(np.int8),
            "n_tokens": np.array(a.n_tokens, dtype=np.int64),
        }

    # ------------------------------------------------------------------------------ render
    def render(self):
        if self.render_mode is None or self.episode is None:
            return None
        wc = self.episode.wc
        if self.render_mode == "ansi":
            return f"T={wc.n_tokens} slots={len(wc)}/{self.w_max} {wc.focus_map(100)}"
        # rgb_array: one 4-pixel column per slot, coloured by level (yellow L0 .. purple L2)
        strip = np.zeros((24, 4 * self.n_slots, 3), dtype=np.uint8)
        colours = LEVEL_COLOURS[np.minimum(wc.levels, len(LEVEL_COLOURS) - 1)]
        strip[:, : 4 * len(wc)] = np.repeat(colours, 4, axis=0)[None]
        return strip
