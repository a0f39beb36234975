"""MegaFocus-v0: learned context focus as a gymnasium environment (adapts ``sim`` to the gym API).
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from megacontext.allocator import AllocatorConfig, recency_scores
from megacontext.lm import pydoc_token_ids
from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError, TreeConfig, mean_gister
from megacontext.working_context import ContextConfig
from sim.policies import Recency
from sim.synthetic import SyntheticConfig, SyntheticOracle, generate_document
from sim.world import Episode, WorldConfig

EMB_BOUND = 1e6  # finite bounds (gymnasium warns on infinite ones); embeddings are O(1)
LEVEL_COLOURS = np.array([[253, 231, 37], [33, 145, 140], [68, 1, 84], [0, 0, 0]], dtype=np.uint8)


class MegaFocusEnv(gym.Env):
    """
    ## Description
    A frozen language model reads a fixed-budget *working context* of tokens (L0) and gists (L1 =
    ``block_size`` tokens, L2 = ``block_size**2``). Each step the cursor ingests ``step_tokens``
    new tokens; the agent then scores every context entry and the focus allocator turns the
    scores into legal expands (positive) and paid collapses (negative) within ``w_max`` slots.
    The reward is how well the refocused context predicts the next ``horizon`` tokens.

    ## Action Space
    ``Box(-1, 1, (w_max,), float32)``: one signed score per slot, multiplied by ``score_scale``
    (nats) before the allocator sees it (so its ``tau_expand`` = 0.2 applies to the scaled value);
    entries past the current context length are ignored. The allocator hard-masks illegal
    directions (L0 never expands, the top level and the recency tail never collapse). A wrong
    shape, NaN/inf or a value outside [-1, 1] raises ``ValueError``.

    ## Observation Space
    A ``Dict``, every array padded to ``w_max`` slots (``n_tail_gists`` for the tail gists):

    | key | shape | dtype | meaning |
    |---|---|---|---|
    | embeddings | (w_max, d_model) | float32 | node embedding (token or gist) |
    | levels | (w_max,) | int64 | tree level, 0 on padding |
    | span_start | (w_max,) | int64 | first token covered |
    | span_width | (w_max,) | int64 | tokens covered (= block_size**level) |
    | distance_to_cursor | (w_max,) | int64 | T minus the span end |
    | can_expand | (w_max,) | int8 | 1 where the entry is a gist |
    | can_collapse | (w_max,) | int8 | 1 where its sibling group can collapse |
    | valid_mask | (w_max,) | int8 | 1 on real entries (a prefix) |
    | tail_gists | (n_tail_gists, d_model) | float32 | newest top-level gist(s) and recent L1 gists
    |
    | tail_mask | (n_tail_gists,) | int8 | 1 on real tail gists |

    ## Rewards
    ``-NLL``: the oracle's mean next-token negative log-likelihood of the next ``horizon`` tokens
    under the refocused context (``oracle="synthetic"``: the exact synthetic world; ``"lm"``: a
    frozen causal LM). ``info`` holds ``nll``, ``recency_nll`` (the same document under the
    recency policy, for comparison), ``actions`` (kind, level, index), ``slots_used`` and
    ``swap_count`` (collapses paid this step).

    ## Starting State
    ``reset`` draws a new document from ``self.np_random`` and ingests ``warmup_tokens`` (budget
    restored oldest first).

    ## Step
    The action refocuses the observed context (the allocator's one pass, DESIGN §4); the reward
    is measured; the cursor then ingests ``step_tokens`` and the budget is restored with this
    action's scores (per node, 0 for nodes it did not score, oldest first among ties). Restore
    collapses are forced: they start no cooldown, so the agent may re-expand them next step.

    ## Episode End
    Terminated when fewer than ``horizon`` tokens remain after the cursor (document end).
    Truncated by ``max_episode_steps`` (registered default 1000) through ``TimeLimit``.

    ## Arguments
    ``oracle`` ("synthetic" | "lm"), ``score_scale`` (1.0), ``block_size`` (32), ``max_level`` (2),
    ``w_max`` (256),
    ``step_tokens`` K (32), ``horizon`` H (64), ``tail_tokens`` R (128), ``n_tail_gists`` (6),
    ``doc_blocks``
    (document length in blocks, 96), ``d_model`` (synthetic only, 64), ``lm`` ("smollm2", "tiny" or
    a model folder; for ``oracle="lm"``), ``gister`` ("auto": the committed GistNet checkpoint when
    it
    fits the LM, else mean pooling; "gistnet"; "mean"; for ``oracle="lm"``), ``render_mode``
    ("ansi" | "rgb_array"), ``debug`` (False; True: ``check_invariants()`` of the working context
    after every reset, refocus and restore, raising ``InvariantViolation`` on the first broken).

    ## Version History
    * v0: initial version (unreleased; the ``gister`` and ``debug`` arguments and the score-based
      restore after ingest were added before any release).
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
        self._last_scores: dict[tuple[int, int], float] = {}
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
            from gistnet.gister import resolve_gister
            from megacontext.lm import load_lm

            model, self._tokenizer = load_lm(lm)
            self._lm_oracle = LMOracle(model)
            d_model = self._lm_oracle.d_model
            self._gister, self.gister_name = resolve_gister(gister, model, block_size)
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
        big = np.iinfo(np.int64).max
        self.observation_space = spaces.Dict(
            {
                "embeddings": spaces.Box(-EMB_BOUND, EMB_BOUND, (w_max, d_model), np.float32),
                "levels": spaces.Box(0, max_level, (w_max,), np.int64),
                "span_start": spaces.Box(0, big, (w_max,), np.int64),
                "span_width": spaces.Box(0, big, (w_max,), np.int64),
                "distance_to_cursor": spaces.Box(0, big, (w_max,), np.int64),
                "can_expand": spaces.MultiBinary(w_max),
                "can_collapse": spaces.MultiBinary(w_max),
                "valid_mask": spaces.MultiBinary(w_max),
                "tail_gists": spaces.Box(
                    -EMB_BOUND, EMB_BOUND, (n_tail_gists, d_model), np.float32
                ),
                "tail_mask": spaces.MultiBinary(n_tail_gists),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (w_max,), np.float32)
        self.episode: Episode | None = None
        self.shadow: Episode | None = None  # the same document under the recency policy

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
        self.episode.advance()
        self.shadow.advance()
        self.episode.restore()
        self.shadow.restore()
        self._last_scores = {}
        if self.debug:
            self.episode.wc.check_invariants()
        return self._obs(), {
            "n_tokens": self.episode.wc.n_tokens,
            "slots_used": len(self.episode.wc),
        }

    def step(self, action):
        if self.episode is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action)
        if action.shape != (self.w_max,):
            raise ValueError(f"action must have shape ({self.w_max},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action must be finite (no NaN or inf)")
        if np.any(np.abs(action) > 1.0 + 1e-6):
            raise ValueError(
                "action values must lie in [-1, 1] (scores are action * score_scale); max |a| = "
                f"{np.abs(action).max()}"
            )
        ep = self.episode
        scores = action[: len(ep.wc)].astype(np.float64) * self.score_scale
        self._last_scores = dict(
            zip(
                zip(ep.wc.levels.tolist(), ep.wc.indices.tolist(), strict=True),
                scores.tolist(),
                strict=True,
            )
        )
        actions = ep.refocus(scores)
        if self.debug:
            ep.wc.check_invariants()
        nll, recency_nll = ep.nll(), self.shadow.nll()
        info = {
            "nll": nll,
            "recency_nll": recency_nll,
            "actions": [(a.kind, a.level, a.index) for a in actions],
            "slots_used": len(ep.wc),
            "swap_count": sum(a.kind == "collapse" for a in actions),
            "n_tokens": ep.wc.n_tokens,
        }
        ep.advance()
        self.shadow.advance()
        # The observation holds at most w_max entries: restore the budget after the ingest with
        # the agent's scores of this step (per node; 0 for nodes it did not score), oldest first
        # among ties, as the allocator's own restore would (DESIGN §4).
        ep.restore(self._carried_scores())
        Recency().apply(self.shadow)  # restores oldest first, expands nothing
        if self.debug:
            ep.wc.check_invariants()
            self.shadow.wc.check_invariants()
        terminated = not ep.can_query()
        return self._obs(), -nll, terminated, False, info

    def _carried_scores(self) -> np.ndarray:
        """The last action's scores mapped onto the current entries by node (0 for new nodes);
        a tiny recency term breaks ties oldest first."""
        assert self.episode is not None
        wc = self.episode.wc
        u = np.array(
            [
                self._last_scores.get(k, 0.0)
                for k in zip(wc.levels.tolist(), wc.indices.tolist(), strict=True)
            ]
        )
        return u + 1e-9 * recency_scores(wc)

    # -------------------------------------------------------------------------- observation
    def _obs(self) -> dict[str, np.ndarray]:
        assert self.episode is not None
        a = self.episode.arrays()
        n, w = a.levels.shape[0], self.w_max

        def pad(x, dtype):
            out = np.zeros((w, *x.shape[1:]), dtype=dtype)
            out[:n] = x
            return out

        return {
            "embeddings": pad(a.embeddings, np.float32),
            "levels": pad(a.levels, np.int64),
            "span_start": pad(a.span_start, np.int64),
            "span_width": pad(a.span_width, np.int64),
            "distance_to_cursor": pad(a.distance_to_cursor, np.int64),
            "can_expand": pad(a.can_expand, np.int8),
            "can_collapse": pad(a.can_collapse, np.int8),
            "valid_mask": pad(np.ones(n, dtype=bool), np.int8),
            "tail_gists": a.tail_gists.astype(np.float32),
            "tail_mask": a.tail_mask.astype(np.int8),
        }

    # ------------------------------------------------------------------------------ render
    def render(self):
        if self.render_mode is None or self.episode is None:
            return None
        wc = self.episode.wc
        if self.render_mode == "ansi":
            return f"T={wc.n_tokens} slots={len(wc)}/{self.w_max} {wc.focus_map(100)}"
        # rgb_array: one 4-pixel column per slot, coloured by level (yellow L0 .. purple L2)
        strip = np.zeros((24, 4 * self.w_max, 3), dtype=np.uint8)
        colours = LEVEL_COLOURS[np.minimum(wc.levels, len(LEVEL_COLOURS) - 1)]
        strip[:, : 4 * len(wc)] = np.repeat(colours, 4, axis=0)[None]
        return strip
