"""Every focus policy, registered once by name: the baselines each LensNet result is compared
against, the exact-label oracle, the synthetic world's past-only reference and LensNet itself.

Each is a ``sim.policy.FocusPolicy``: one ``scores(view)``, applied by the base class, so the same
object acts on a stream step (``sim.run``) and on question-time zoom rounds (``sim.evaluate``);
``worlds`` says where a policy applies. Stream and question time alike:
- ``recency``: restore oldest first, expand nothing (the newest detail stays at L0);
- ``random``: random scores (in a stream Gaussian per entry; at question time a uniform relevance
  per block, drawn from the seed and the task id, so every run gives a task the same draw);
- ``oracle``: the exact counterfactual labels of the continuation (``label_snapshot``; at question
  time with the two-level lookahead for L2 gists, ``megacontext.labels.lookahead_contexts``);
- ``lensnet``: a trained LensNet's calibrated scores (``LensNet.score``); ``lensnet_rank``: the
  same order on the heuristics' rank scale (``sim.taskworld.features.rank_scores``).
Streams only: ``all_coarse`` (collapse every legal group: the coarsest legal cover) and ``cue`` (the
synthetic world's past-only reference, ``sim.streamworld.synthetic.cue_scores``). Question time
only, through ``sim.taskworld.features.relevance_scores`` (a relevance in [0, 1] per L1 block):
- ``sinks``: StreamingLLM's attention sinks + recent window: the first block's path expands to L0;
- ``retrieval``: dense query-aware block retrieval from LM hidden states (MoBA's mean-pooled block
  key, on hidden states): every L1 block is read by the LM alone and its hidden states at layer
  ``round(retrieval_depth * n_layers)`` are mean-pooled without position 0 (where the LM puts its
  attention-sink activations); the query (exactly the question's tokens, or with no question the
  stream's last ``context_query_tokens``) is pooled the same way; relevance = cosine,
  rank-normalised. Layer and centring were chosen on
  training tasks only (``benchmarks/retrieval_layer.py``);
- ``bm25``: lexical retrieval, Okapi BM25 (``bm25s``, English stop words) of each L1 block's text
  (the query's own tokens left out) against the question's (or the last 32 tokens'),
  rank-normalised;
- ``attention``: the LM's own attention, training-free: the softmax attention mass the stream's last
  token (the question's last, or with no question the stream's) puts on each L1 block's keys,
  averaged over every head of a window of layers (``attention_layers``, fractions of depth, chosen
  per read mode on training tasks), the sink token (token 0) left out; in the faithful mode (the
  default) the keys are the stream's as the working context read them and each round's query
  comes from the LM's forward over that round's context; rank-normalised;
- ``surprisal``: LLMLingua-style: the block's mean token NLL when read alone, rank-normalised;
- ``full``: the whole stream as tokens (the LM's ceiling, where it fits the LM's positions).

A new policy: a subclass here with ``name``, ``worlds`` and ``scores``, decorated ``@register``;
``sim.run`` and ``sim.evaluate`` then accept its name.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import numpy as np
import torch

from lensnet.data import arrays_to_item, collate
from megacontext.allocator import Action, recency_scores
from megacontext.labels import label_snapshot
from megacontext.tree import ConfigError
from megacontext.working_context import ContextArrays
from sim.policy import FocusPolicy, FocusView, PolicyContext
from sim.streamworld.synthetic import SyntheticConfig, cue_scores
from sim.streamworld.world import Episode
from sim.taskworld.features import (
    RETRIEVAL_CENTRE,
    attention_layer_range,
    bm25_relevance,
    dense_relevance,
    lensnet_item,
    rank_scores,
    ranked_relevance_scores,
    relevance_scores,
)
from sim.taskworld.world import check_query_fits as query_fits

REGISTRY: dict[str, type[FocusPolicy]] = {}


def register(cls: type[FocusPolicy]) -> type[FocusPolicy]:
    """Make ``cls`` available by its ``name`` (one name, one class)."""
    assert cls.name not in REGISTRY, f"policy name {cls.name!r} registered twice"
    REGISTRY[cls.name] = cls
    return cls


def policy_names(world: str) -> tuple[str, ...]:
    """The registered policies that apply in ``world`` ('stream' or 'tasks')."""
    return tuple(name for name, cls in REGISTRY.items() if world in cls.worlds)


def check_query_fits(pt, policies: list[FocusPolicy]) -> None:
    """``sim.taskworld.world.check_query_fits`` for every policy that reads the query (a
    LensNet)."""
    for p in policies:
        limit = getattr(p, "query_limit", None)
        if limit is not None:
            query_fits(pt, limit, p.name)


def build_policy(name: str, ctx: PolicyContext, world: str | None = None) -> FocusPolicy:
    """The registered policy ``name`` for a run; a ``ConfigError`` names the choices when ``name``
    is unknown (or does not apply in ``world``)."""
    choices = policy_names(world) if world else tuple(REGISTRY)
    if name not in choices:
        raise ConfigError(
            f"unknown policy {name!r}"
            + (f" for {world}" if world else "")
            + f" (choose from {', '.join(choices)})"
        )
    return REGISTRY[name].build(ctx)


# ------------------------------------------------------------------------- stream and questions
@register
class Recency(FocusPolicy):
    name = "recency"

    def scores(self, view: FocusView) -> np.ndarray:
        return recency_scores(view.wc)


@register
class RandomScores(FocusPolicy):
    """Random scores: Gaussian per entry in a stream (``rng``), a uniform relevance per block at
    question time (from ``seed`` and the task id)."""

    name = "random"

    def __init__(
        self, rng: np.random.Generator | None = None, scale: float = 1.0, seed: int = 0
    ) -> None:
        self.rng = rng if rng is not None else np.random.default_rng([seed, 7])
        self.scale, self.seed = scale, seed

    @classmethod
    def build(cls, ctx: PolicyContext) -> RandomScores:
        return cls(seed=ctx.seed)

    def scores(self, view: FocusView) -> np.ndarray:
        if view.task is None:
            return self.rng.normal(scale=self.scale, size=len(view.wc))
        rng = np.random.default_rng([self.seed, zlib.crc32(str(view.task.task["id"]).encode())])
        return relevance_scores(view.wc, rng.random(view.task.n_tokens // view.wc.block_size))


@register
class GreedyOracle(FocusPolicy):
    """Scores = the exact counterfactual utilities of every action (one oracle call per action).
    ``keep``: every labelled snapshot is kept in ``snapshots`` (question-time traces)."""

    name = "oracle"

    def __init__(self, doc_id: int = 0, keep: bool = False) -> None:
        self.doc_id, self.keep = doc_id, keep
        self.snapshots: list[dict] = []

    def scores(self, view: FocusView) -> np.ndarray:
        labels = label_snapshot(
            view.wc,
            view.oracle,
            view.target_ids,
            view.wc.n_tokens,
            view.n_tail_gists,
            self.doc_id,
            view.lookahead,
        )
        if self.keep:
            self.snapshots.append(labels)
        return labels["target_utilities"].astype(np.float64)


@register
class LensNetPolicy(FocusPolicy):
    """LensNet's calibrated scores: raw x ``score_scale`` (``LensNet.score``), or its order on the
    heuristics' rank scale where its calibration's gate is 'rank'. ``scale`` overrides the model's
    calibration, gate included (``scale=1``: the raw scores, to show what calibration adds)."""

    name = "lensnet"
    rank: ClassVar[bool | None] = None  # None: the model's calibrated gate

    def __init__(
        self,
        model,
        device: torch.device | str = "cpu",
        scale: float | None = None,
        name: str | None = None,
    ) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.scale = scale
        if name is not None:
            self.name = name  # type: ignore[misc]  (an instance label, e.g. 'lensnet_raw')

    @classmethod
    def build(cls, ctx: PolicyContext) -> LensNetPolicy:
        if ctx.lensnet is None:
            raise ConfigError(f"policy {cls.name!r} needs a trained LensNet")
        return cls(ctx.lensnet, ctx.device)

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        """A LensNet with attention features needs the task's attention (``prepare_task``)."""
        return self.model.config.n_entry_features > 0

    def entry_scores(self, arr: ContextArrays | dict) -> np.ndarray:
        """(N,) LensNet's scores of one context's entries (its arrays, or a whole dataset item),
        on the allocator's scale."""
        item = arr if isinstance(arr, dict) else arrays_to_item(arr)
        batch = {k: v.to(self.device) for k, v in collate([item]).items()}
        u = self.model.score(batch)[0].double().cpu().numpy()
        return u if self.scale is None else u * (self.scale / self.model.score_scale)

    def scores(self, view: FocusView) -> np.ndarray:
        cfg = self.model.config
        if view.task is None:  # a stream step: the seed's inputs
            if cfg.n_entry_features or cfg.n_query_tokens:
                raise ConfigError(
                    "this LensNet reads task-world inputs (attention features / query tokens): "
                    "it scores question-time task contexts only"
                )
            u = self.entry_scores(view.wc.arrays(view.n_tail_gists))
        else:
            probs = (view.task.question_attention(view.wc, view.oracle)
                     if cfg.n_entry_features else None)
            item = lensnet_item(view.wc, view.n_tail_gists, cfg.n_query_tokens, probs,
                                cfg.feature_set, view.task.block_lexical, view.task.query)
            u = self.entry_scores(item)
        return rank_scores(view.wc, u) if self.gated_by_rank else u

    @property
    def query_limit(self) -> int | None:
        """The most question tokens this LensNet reads (None: it reads no query)."""
        return self.model.config.n_query_tokens or None

    @property
    def gated_by_rank(self) -> bool:
        """Scores on the rank scale: ``lensnet_rank``, or ``lensnet`` whose calibration chose the
        rank gate (unless ``scale`` overrides the calibration)."""
        if self.rank is not None:
            return self.rank
        return self.scale is None and self.model.score_gate == "rank"


@register
class LensNetRank(LensNetPolicy):
    """LensNet's order on the heuristics' rank scale (``rank_scores``): gates a scorer whose values
    are shrunk but whose order is right the way the heuristics are gated."""

    name = "lensnet_rank"
    rank = True


# ------------------------------------------------------------------------------- streams only
@register
class AllCoarse(FocusPolicy):
    """Collapse every legal group: the tail at L0, everything older as coarse as it can be."""

    name = "all_coarse"
    worlds = ("stream",)

    def apply(self, ep: Episode) -> list[Action]:
        actions = ep.restore()
        b = ep.wc.block_size
        while (starts := ep.wc.group_starts()).size:
            s = int(starts[0])
            parent = (int(ep.wc.levels[s]) + 1, int(ep.wc.indices[s]) // b)
            actions.append(Action("collapse", *parent, ep.wc.collapse(*parent)))
        return actions


@register
class CueReference(FocusPolicy):
    """The synthetic world's past-only reference (``sim.streamworld.synthetic.cue_scores``): the
    ceiling of what a scorer reading LensNet's inputs can reach. Synthetic streams only."""

    name = "cue"
    worlds = ("stream",)

    def scores(self, view: FocusView) -> np.ndarray:
        synthetic = getattr(view.oracle, "config", None)
        if not isinstance(synthetic, SyntheticConfig):
            raise TypeError(
                "the cue reference reads the synthetic generator's structure: "
                "synthetic episodes only"
            )
        return cue_scores(view.wc.arrays(view.n_tail_gists), synthetic)


# ---------------------------------------------------------------------------- question time only
class BlockRelevance(FocusPolicy):
    """A question-time baseline from a relevance per L1 block: a subclass gives ``relevance(pt)``
    ((n_l1,) for prepared task ``pt``); its ranks become the allocator's scores
    (``relevance_scores`` of ``rank01``)."""

    worlds = ("tasks",)

    def relevance(self, pt) -> np.ndarray:
        raise NotImplementedError

    def scores(self, view: FocusView) -> np.ndarray:
        return ranked_relevance_scores(view.wc, self.relevance(view.task))


@register
class Sinks(FocusPolicy):
    """StreamingLLM: the first ``n_sink_blocks`` blocks (the attention sinks) expand to L0."""

    name = "sinks"
    worlds = ("tasks",)

    def __init__(self, n_sink_blocks: int = 1) -> None:
        self.n = n_sink_blocks

    def scores(self, view: FocusView) -> np.ndarray:
        rel = np.zeros(view.task.n_tokens // view.wc.block_size)
        rel[: self.n] = 1.0
        return relevance_scores(view.wc, rel)


@register
class DenseRetrieval(BlockRelevance):
    """Dense retrieval: the cosine of the query's and each block's pooled hidden state."""

    name = "retrieval"
    needs_features = True

    def relevance(self, pt) -> np.ndarray:
        """(n_l1,) the query's cosine with each block of prepared task ``pt``."""
        return dense_relevance(pt.block_hidden, pt.query_hidden, RETRIEVAL_CENTRE)


@register
class BM25(BlockRelevance):
    """Lexical retrieval: BM25 of each block's text against the question (``bm25_relevance``)."""

    name = "bm25"

    def relevance(self, pt) -> np.ndarray:
        """(n_l1,) each block's BM25 score against the query of prepared task ``pt``."""
        if pt.block_lexical is not None:
            return pt.block_lexical  # prepare_task's bm25_relevance of the same texts
        return bm25_relevance(pt.block_text, pt.query_text)


@register
class Attention(FocusPolicy):
    """Training-free question-time focus from the LM's own attention: the blocks the question's
    last token attends to most (``PreparedTask.block_attention``: averaged over the heads of the
    read mode's layer window, the sink token left out) expand first. In the faithful mode each
    round's query comes from the LM's forward over that round's working context."""

    name = "attention"
    worlds = ("tasks",)
    needs_attention = True

    def __init__(self, window: tuple[float, float] | None = None) -> None:
        self.window = window  # None: the world's (TaskWorldConfig.attention_window)

    def scores(self, view: FocusView) -> np.ndarray:
        n_layers = view.oracle.model.config.num_hidden_layers
        layers = attention_layer_range(self.window or view.attention_window, n_layers)
        rel = view.task.block_attention(view.wc, view.oracle, layers)
        return ranked_relevance_scores(view.wc, rel)


@register
class Surprisal(BlockRelevance):
    """LLMLingua-style: the most surprising blocks (read alone) expand first."""

    name = "surprisal"
    needs_features = needs_surprisal = True

    def relevance(self, pt) -> np.ndarray:
        """(n_l1,) each block's mean token NLL when read alone."""
        return pt.block_surprisal


@register
class FullContext(FocusPolicy):
    """The whole stream as tokens, no working context: the LM's ceiling."""

    name = "full"
    worlds = ("tasks",)
    reads_everything = True
