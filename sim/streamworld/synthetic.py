"""The synthetic world (DESIGN.md §6): documents whose right focus is known exactly, and its oracle.

A document is a run of L1 blocks. Block j has a *key* (orthonormal across the document's blocks
when d_model/2 allows, random unit vectors otherwise). Its tokens' embeddings carry that key in
their first half (so its gist does too) and, in their second half, a *cue*: the sum of the keys of
the blocks that the next two blocks (the query window after a cursor at the end of block j) refer
to — so the tail gists show what is about to be needed. Two halves keep "block r is needed" an
exact bilinear match (key half of a context gist against cue half of a tail gist) instead of a
plain similarity that would also fire between blocks sharing upcoming references. Each block q
refers to a few earlier blocks r (mostly recent, some far) with
weights w. The NLL of a query token in block q is

    base - sum_{r in refs(q)} w_r * info[level at which block r stands]  - recency

with info[L0] = 1 > info[L1] > info[L2] > 0, and recency = rho * (fraction of the ``n_recent``
blocks before the cursor that stand at L0). Utilities are therefore exact: ``exact_utilities``
computes every expand gain and collapse cost in closed form (per block, not by re-evaluating
contexts), which the labeller tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megacontext.labels import target_utility
from megacontext.tree import ConfigError
from megacontext.working_context import ContextArrays, WorkingContext


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator and NLL of the synthetic world."""

    d_model: int = 128
    """Embedding width."""
    block_size: int = 32
    """Tokens per block (= the tree's b)."""
    n_blocks: int = 64
    """Blocks per document (tokens = n_blocks * block_size)."""
    refs_min: int = 1
    """Fewest earlier blocks a block refers to."""
    refs_max: int = 3
    """Most earlier blocks a block refers to."""
    p_far: float = 0.4
    """Probability that a reference is uniform over all earlier blocks rather than recent."""
    recent_window: int = 12
    """'Recent' references fall in the this many blocks before the gap."""
    gap: int = 2
    """A block never refers to its own nor the gap-1 blocks just before it."""
    key_scale: float = 1.0
    """Weight of the block's own key in its tokens."""
    cue_scale: float = 1.0
    """Weight of each upcoming reference's key in the cue half of the cue block's tokens."""
    weight_min: float = 1.0
    """References weigh uniformly in [weight_min, weight_max] (nats per unit of info)."""
    weight_max: float = 2.0
    """See weight_min."""
    noise: float = 0.15
    """Per-token Gaussian noise std."""
    info: tuple[float, ...] = (1.0, 0.6, 0.25)
    """info[level]: how much of a reference a block standing at that level serves."""
    base_nll: float = 4.0
    """NLL of a query token with nothing served."""
    rho: float = 0.05
    """Weight of the recency term."""
    n_recent: int = 6
    """Blocks before the cursor that the recency term looks at."""
    vocab_size: int = 1000
    """Token ids are drawn from this range (they carry no information)."""

    def __post_init__(self) -> None:
        if self.n_blocks < self.gap + 2:
            raise ConfigError(f"n_blocks must be >= gap + 2, got {self.n_blocks}")
        if not 1 <= self.refs_min <= self.refs_max:
            raise ConfigError("need 1 <= refs_min <= refs_max")
        info = np.asarray(self.info)
        if info.ndim != 1 or len(info) < 2 or np.any(np.diff(info) >= 0) or info[-1] <= 0:
            raise ConfigError(f"info must be strictly decreasing and positive, got {self.info}")
        if self.d_model < 2 or self.d_model % 2:
            raise ConfigError(f"d_model must be even (key half + cue half), got {self.d_model}")
        if not 0 < self.weight_min <= self.weight_max:
            raise ConfigError("need 0 < weight_min <= weight_max")
        if not 0.0 <= self.p_far <= 1.0:
            raise ConfigError(f"p_far must be in [0, 1], got {self.p_far}")


@dataclass
class SyntheticDocument:
    """One generated document."""

    token_ids: np.ndarray  # (T,)
    embeddings: np.ndarray  # (T, d) float32
    keys: np.ndarray  # (n_blocks, d) unit vectors
    ref_blocks: list[np.ndarray]  # per block q: referenced earlier blocks
    ref_weights: list[np.ndarray]  # per block q: their weights
    config: SyntheticConfig

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def generate_document(config: SyntheticConfig, rng: np.random.Generator) -> SyntheticDocument:
    """A seeded document (all randomness from ``rng``)."""
    c = config
    k_dim = c.d_model // 2
    if c.n_blocks <= k_dim:  # orthonormal keys: a reference matches exactly, others not at all
        q, _ = np.linalg.qr(rng.normal(size=(k_dim, k_dim)))
        keys = q[: c.n_blocks]
    else:
        keys = rng.normal(size=(c.n_blocks, k_dim))
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    refs: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for q_block in range(c.n_blocks):
        hi = q_block - c.gap + 1  # references fall in [0, hi)
        if hi <= 0:
            refs.append(np.zeros(0, dtype=np.int64))
            weights.append(np.zeros(0))
            continue
        k = int(rng.integers(c.refs_min, c.refs_max + 1))
        far = rng.random(k) < c.p_far
        lo_recent = max(0, hi - c.recent_window)
        picks = np.unique(np.where(far, rng.integers(0, hi, k), rng.integers(lo_recent, hi, k)))
        refs.append(picks.astype(np.int64))
        weights.append(rng.uniform(c.weight_min, c.weight_max, picks.size))
    emb = np.zeros((c.n_blocks, c.block_size, c.d_model))
    for j in range(c.n_blocks):
        upcoming = [refs[q] for q in (j + 1, j + 2) if q < c.n_blocks]
        cue_blocks = (
            np.unique(np.concatenate(upcoming)) if upcoming else np.zeros(0, dtype=np.int64)
        )
        emb[j, :, :k_dim] = c.key_scale * keys[j]  # what this block is
        if cue_blocks.size:
            emb[j, :, k_dim : 2 * k_dim] = c.cue_scale * keys[cue_blocks].sum(
                0
            )  # what comes next needs
    emb += c.noise * rng.normal(size=emb.shape)
    ids = rng.integers(0, c.vocab_size, c.n_blocks * c.block_size)
    return SyntheticDocument(
        ids, emb.reshape(-1, c.d_model).astype(np.float32), keys, refs, weights, c
    )


class SyntheticOracle:
    """Exact NLL of the synthetic world; implements the ``NLLOracle`` interface."""

    def __init__(self, document: SyntheticDocument) -> None:
        self.doc = document
        self.config = document.config
        self.d_model = document.config.d_model

    def block_levels(self, ctx: ContextArrays) -> np.ndarray:
        """(n_blocks covered,) level at which each L1 block stands (a partial block: 0)."""
        b = self.config.block_size
        n_blocks = -(-ctx.n_tokens // b)
        lv = np.zeros(n_blocks, dtype=np.int64)
        gist = ctx.levels >= 1
        first = ctx.span_start[gist] // b
        count = ctx.span_width[gist] // b
        lv[np.repeat(first, count) + _ranges(count)] = np.repeat(ctx.levels[gist], count)
        return lv

    def token_nll(self, block_level: np.ndarray, query_start: int, horizon: int) -> np.ndarray:
        """(horizon,) NLL of each query token given the level of every block."""
        c = self.config
        info = np.asarray(c.info)
        q_blocks = (query_start + np.arange(horizon)) // c.block_size
        served = np.zeros(horizon)
        for q in np.unique(q_blocks):
            if q >= c.n_blocks:
                raise ValueError(f"query reaches past the document end (block {q} of {c.n_blocks})")
            r = self.doc.ref_blocks[q]
            served[q_blocks == q] = float(np.sum(self.doc.ref_weights[q] * info[block_level[r]]))
        cursor_block = query_start // c.block_size
        recent = block_level[max(0, cursor_block - c.n_recent) : cursor_block]
        recency = c.rho * float(np.mean(recent == 0)) if recent.size else 0.0
        return c.base_nll - served - recency

    def nll(
        self, contexts: Sequence[ContextArrays], query_ids: np.ndarray, query_start: int
    ) -> np.ndarray:
        """Mean NLL of the query tokens for each context (``query_ids`` only fixes the horizon)."""
        h = int(np.asarray(query_ids).shape[0])
        return np.array(
            [self.token_nll(self.block_levels(ctx), query_start, h).mean() for ctx in contexts]
        )


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0..c0), [0..c1), ... concatenated."""
    if counts.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(ends[-1]) - np.repeat(ends - counts, counts)


def exact_utilities(
    oracle: SyntheticOracle, wc: WorkingContext, horizon: int
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form (expand_gain, collapse_cost) per entry, computed per block from the NLL formula.

    Expanding a level-l entry moves each block it covers from level l to l-1; collapsing a group
    of level-l siblings moves each block they cover to level l+1. The change in mean NLL is the
    sum over referenced blocks of weight x info change x (query tokens that reference it) / H,
    plus the change of the recency term. Gains and costs are clipped at 0 as in DESIGN §3.
    """
    c = oracle.config
    b, info = c.block_size, np.asarray(c.info)
    t = wc.n_tokens
    arr = wc.arrays()
    base_lv = oracle.block_levels(arr)
    n_blocks = base_lv.size
    # demand[r]: sum over query tokens of the weight with which they reference block r, / H
    demand = np.zeros(n_blocks)
    for p in range(t, t + horizon):
        q = p // b
        np.add.at(demand, oracle.doc.ref_blocks[q], oracle.doc.ref_weights[q] / horizon)
    cursor_block = t // b
    recent = np.zeros(n_blocks, dtype=bool)
    recent[max(0, cursor_block - c.n_recent) : cursor_block] = True
    n_recent = int(recent.sum())

    def delta(blocks: np.ndarray, new_level: int) -> float:
        """Mean-NLL change when ``blocks`` move from their base level to ``new_level``."""
        d_served = float(np.sum(demand[blocks] * (info[new_level] - info[base_lv[blocks]])))
        d_l0 = int(np.sum(recent[blocks] & (new_level == 0))) - int(
            np.sum(recent[blocks] & (base_lv[blocks] == 0))
        )
        d_recency = c.rho * d_l0 / n_recent if n_recent else 0.0
        return -(d_served + d_recency)

    gain = np.zeros(len(wc))
    cost = np.zeros(len(wc))
    for i in np.flatnonzero(arr.levels >= 1):
        blocks = np.arange(arr.span_start[i] // b, (arr.span_start[i] + arr.span_width[i]) // b)
        gain[i] = max(0.0, -delta(blocks, int(arr.levels[i]) - 1))
    for s in np.unique(arr.group_id[arr.group_id >= 0]):
        lo = arr.span_start[s]
        hi = arr.span_start[s + b - 1] + arr.span_width[s + b - 1]
        blocks = np.arange(lo // b, -(-hi // b))
        cost[s : s + b] = max(0.0, delta(blocks, int(arr.levels[s]) + 1))
    return gain, cost


def cue_scores(arr: ContextArrays, config: SyntheticConfig) -> np.ndarray:
    """The *cue* reference scorer: what a scorer reading only LensNet's inputs can know (no future).

    Written from the generator's definition: the newest L1 tail gist (the last complete block
    before the cursor) carries, in its cue half, the sum of the keys of the blocks that the next
    two blocks (the query window) refer to; every block carries its own key in the key half. So
    ``m_r = cue . key_r`` (about 1 for a referenced block, 0 otherwise, orthonormal keys) estimates
    block r's share of the demand. An entry's key half is the mean of its blocks' keys, so the
    number of referenced blocks it covers is ``m x blocks``; a token's key is taken from its
    sibling group's mean (the block's clean key; one token is noisy). The score then follows the
    closed-form utilities of ``exact_utilities`` with each referenced block's demand replaced by its
    expectation (mean weight x one query block of two): expand gain = demand x (info[l-1] -
    info[l]),
    collapse cost of a group = demand x (info[l] - info[l+1]) summed over the group's blocks, plus
    the recency term, and y = gain [can expand] - cost [can collapse], as the labels define it.
    What it cannot know is each reference's weight and whether both query blocks refer to a block.
    """
    c = config
    k_dim = c.d_model // 2
    b = c.block_size
    n = arr.levels.shape[0]
    real = np.flatnonzero(arr.tail_mask & (arr.tail_levels == 1))
    if real.size == 0 or n == 0:  # no complete L1 block yet: nothing is known about what comes next
        return np.zeros(n)
    cue = (
        arr.tail_gists[real[-1], k_dim:].astype(np.float64) / c.cue_scale
    )  # newest L1 gist's cue half
    emb = arr.embeddings[:, :k_dim].astype(np.float64) / c.key_scale
    gid = arr.group_id
    # tokens read their group's mean key (the block's key); gists their own (a mean over their
    # blocks)
    grouped = gid >= 0
    key = emb.copy()
    if grouped.any():
        sums = np.zeros((n, k_dim))
        np.add.at(sums, gid[grouped], emb[grouped])
        counts = np.bincount(gid[grouped], minlength=n)
        means = sums / np.maximum(counts, 1)[:, None]
        tok = grouped & (arr.levels == 0)
        key[tok] = means[gid[tok]]
    blocks = np.maximum(
        arr.span_width // b, 1
    )  # L1 blocks an entry covers (a token: its block, shared)
    referenced = (
        np.clip(key @ cue, 0.0, None) * blocks
    )  # expected referenced blocks under the entry
    demand = 0.5 * (c.weight_min + c.weight_max) / 2  # mean weight x half the query window's tokens
    info = np.asarray(c.info, dtype=np.float64)
    lv = arr.levels
    cursor_block = arr.n_tokens // b
    first_recent = max(0, cursor_block - c.n_recent)
    n_recent = cursor_block - first_recent
    start_block = arr.span_start // b
    end_block = -(-(arr.span_start + arr.span_width) // b)
    recent_blocks = np.clip(
        np.minimum(end_block, cursor_block) - np.maximum(start_block, first_recent), 0, None
    )
    rec = c.rho / n_recent if n_recent else 0.0
    # expand: level l -> l-1 (to L0 only from L1: the recency term counts L0 blocks)
    gain = np.zeros(n)
    ex = arr.can_expand
    lo = np.clip(lv - 1, 0, None)
    gain[ex] = demand * referenced[ex] * (info[lo[ex]] - info[lv[ex]]) + rec * recent_blocks[ex] * (
        lv[ex] == 1
    )
    # collapse: a group of level-l siblings -> level l+1; its cost is summed over the group's blocks
    cost = np.zeros(n)
    if grouped.any():
        hi = np.clip(lv + 1, 0, len(info) - 1)
        per_member = demand * referenced * (info[lv] - info[hi])
        per_member = np.where(lv == 0, per_member / b, per_member)  # b tokens share one block
        per_member += rec * recent_blocks * (lv == 0) / b
        group_cost = np.zeros(n)
        np.add.at(group_cost, gid[grouped], per_member[grouped])
        cost[grouped] = group_cost[gid[grouped]]
    return target_utility(gain, cost, ex, arr.can_collapse)
