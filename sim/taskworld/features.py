"""Per-block features of a task stream and the heuristic scales built on them: the block-alone
hidden states and surprisal the dense-retrieval and surprisal baselines read, the last token's
attention mass per block the attention baseline reads, BM25 over block text, and the two ways a
per-block relevance (or any scorer's order) becomes the allocator's signed scores
(``relevance_scores``, ``rank_scores``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from lensnet.data import arrays_to_item
from megacontext.allocator import recency_scores
from megacontext.lm_oracle import LMOracle
from megacontext.working_context import WorkingContext
from sim.taskworld import keystore

RETRIEVAL_DEPTH = 1 / 30
"""Dense retrieval's layer as a fraction of the LM's depth (layer 1 of SmolLM2's 30): chosen by
the needle block's mean reciprocal rank over training tasks only (``benchmarks/retrieval_layer.py``;
its figures are in ``results/retrieval-layer-seed0``)."""
RETRIEVAL_CENTRE = False
"""Whether dense retrieval centres both sides on the mean block vector: chosen on the same training
tasks (``results/retrieval-layer-seed0``)."""
ATTENTION_LAYERS: dict[str, tuple[float, float]] = {
    "full-read": (18 / 30, 22 / 30),
    "faithful": (18 / 30, 19 / 30),
}
"""The attention baseline's window of layers as fractions of the LM's depth, [lo, hi), per read
mode, each chosen on 24 *training* tasks in that mode, the sink token left out
(``python -m benchmarks.attention_window``, ``results/attention-window-faithful/``): faithful,
layer 18 of SmolLM2's 30 alone (the needle block first in 15/24, MRR 0.73; the late window 21-25
that the full read had picked: 3/24), where the question's query has not read the needle; full
read, layers 18-21 (20/24, MRR 0.89; 21-25: 17/24). Fractions, so the same rule applies to an LM
of any depth."""


class _Stop(Exception):
    """Ends a forward once the hidden states asked for are in hand (``_hidden_upto``)."""


def _hidden_upto(model, input_ids: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """The residual stream entering each of ``layers`` (HF ``hidden_states[k]``, k < the LM's
    depth) without running the layers above the highest: the forward stops there."""
    blocks = model.base_model.layers
    top = max(layers)
    if not 0 <= top < len(blocks):
        raise ValueError(f"layers {layers} must lie in [0, {len(blocks)}) to stop early")
    seen: dict[int, torch.Tensor] = {}

    def grab(k):
        def hook(_m, args, kwargs):
            seen[k] = (args[0] if args else kwargs["hidden_states"]).float()
            if k == top:
                raise _Stop

        return hook

    hooks = [blocks[k].register_forward_pre_hook(grab(k), with_kwargs=True) for k in set(layers)]
    try:
        model.base_model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return [seen[k] for k in layers]


@torch.no_grad()
def block_features(
    oracle: LMOracle,
    ids: np.ndarray,
    b: int,
    query_ids: np.ndarray,
    layers: int | list[int],
    chunk: int = 16,
    surprisal: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Each complete L1 block read by the LM alone, and the query read alone: (block hidden states
    at each of ``layers``, mean-pooled over positions 1.. (L, n_l1, d); the blocks' mean token NLL
    (n_l1,), or None without ``surprisal``; the query's hidden states pooled the same way (L, d)).
    Position 0 of a sequence read alone holds the LM's attention-sink activations, shared by every
    block: it is left out. Without ``surprisal`` the forward stops at the highest of ``layers``
    (dense retrieval reads layer 1 of 30: a fifteenth of the cost, no logits)."""
    model = oracle.model
    layers = [layers] if isinstance(layers, int) else list(layers)
    early = not surprisal and min(layers) >= 0 and max(layers) < len(model.base_model.layers)

    def states(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if early:
            return _hidden_upto(model, x, layers), None
        out = model(input_ids=x, output_hidden_states=True, use_cache=False)
        return [out.hidden_states[k].float() for k in layers], out.logits

    n_l1 = len(ids) // b
    blocks = torch.as_tensor(ids[: n_l1 * b].reshape(n_l1, b), device=oracle.device)
    hidden, nll = [], []
    for s in range(0, n_l1, chunk):
        x = blocks[s : s + chunk]
        h, logits = states(x)
        hidden.append(torch.stack([y[:, 1:].mean(dim=1) for y in h]).cpu())
        if surprisal:
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none"
            )
            nll.append(ce.mean(dim=1).cpu())
    q = torch.as_tensor(query_ids, device=oracle.device)[None]
    q_states, _ = states(q)
    q_hidden = torch.stack(
        [h[0, 1:].mean(dim=0) if q.shape[1] > 1 else h[0, 0] for h in q_states]
    ).cpu()
    d = oracle.d_model
    return (
        torch.cat(hidden, dim=1).numpy() if hidden else np.zeros((len(layers), 0, d), np.float32),
        (torch.cat(nll).numpy() if nll else np.zeros(0, np.float32)) if surprisal else None,
        q_hidden.numpy(),
    )


def attention_layer_range(window: tuple[float, float], n_layers: int) -> range:
    """The layer indices of a ``window`` [lo, hi) given as fractions of an ``n_layers``-deep LM:
    ``range(round(lo * n), round(hi * n))``, widened to at least one layer (clipped to the LM)."""
    lo, hi = window
    start = min(round(lo * n_layers), n_layers - 1)
    return range(start, min(max(round(hi * n_layers), start + 1), n_layers))


def block_mass(probs: np.ndarray, b: int) -> np.ndarray:
    """(n_l1,) per complete L1 block the attention mass of (..., n) probabilities over stream
    tokens, averaged over every leading axis (rows, layers, heads)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p.reshape(-1, p.shape[-1]).mean(axis=0)
    n_l1 = p.shape[0] // b
    return p[: n_l1 * b].reshape(n_l1, b).sum(axis=1)


def answer_relevance(store: keystore.KeyStore, n_stream: int, b: int) -> np.ndarray:
    """The cheap label's per-block relevance (n_l1,): the attention the positions that predict the
    answer (the stream's last token, then every answer token but the last, teacher-forced: the
    store's queries) put on each complete L1 block of the stream: per position and layer the
    largest mass any head puts on the block, averaged over positions and layers, the sink token
    left out and each row renormalised (``sim.taskworld.keystore.drop_sink``: block 0 is labelled on
    its content like any other). The max over heads was chosen on the committed *train* task files
    (``benchmarks/cheap_label_rule.py``): the mean over heads lets the many heads that attend by
    position drown the few that retrieve."""
    rows = (keystore.drop_sink(store.probs(r, n_keys=n_stream))
            for r in range(store.queries.shape[2]))  # one row at a time: (L, H, n) each
    return answer_rows_relevance(rows, n_stream // b, b)


def answer_rows_relevance(rows: Iterable[np.ndarray], n_l1: int, b: int) -> np.ndarray:
    """The cheap label's rule (``answer_relevance``) on answer rows' probabilities, each (L, H, n)
    with the sink already dropped: per row and layer the largest mass any head puts on each of the
    first ``n_l1`` L1 blocks, averaged over layers, then over rows. Its one home: the labels and
    ``benchmarks/cheap_label_rule.py``, which chose it, both call it."""
    rel, n_rows = np.zeros(n_l1), 0
    for p in rows:
        p = p[..., : n_l1 * b]
        rel += p.reshape(*p.shape[:2], n_l1, b).sum(-1).max(axis=1).mean(axis=0)
        n_rows += 1
    return rel / n_rows


def lensnet_item(
    wc: WorkingContext,
    n_tail_gists: int,
    n_query_tokens: int = 0,
    probs: np.ndarray | None = None,
    feature_set: str = "attention",
    block_lexical: np.ndarray | None = None,
    query: slice | None = None,
) -> dict:
    """LensNet's input for one working context of a task stream: ``wc.arrays``, with the embeddings
    of the query's tokens (``query``: stream positions, at question time exactly the task's
    question, ``sim.taskworld.world.query_span``; zero padded to ``n_query_tokens``) appended to the
    tail latents (level 0), and, with ``probs`` (L, H, n: the question's attention over the stream,
    ``PreparedTask.question_attention``), each entry's features of ``feature_set``
    (``sim.taskworld.keystore.FEATURE_SETS``): the attention features
    (``sim.taskworld.keystore.span_features``), for 'relative-lexical' relative to the context and
    followed by the lexical ones from ``block_lexical`` (``PreparedTask.block_lexical``,
    ``sim.taskworld.keystore.lexical_features``). A query longer than ``n_query_tokens`` is a
    ``QueryTooLong`` error: never cut."""
    arr = wc.arrays(n_tail_gists)
    if n_query_tokens:
        if query is None:
            raise ValueError("LensNet reads the query's tokens: pass query (its stream positions)")
        q = query.stop - query.start
        if q > n_query_tokens:
            raise QueryTooLong(
                f"the question ({q} tokens) is longer than LensNet's {n_query_tokens} query "
                "inputs"
            )
        emb = np.zeros((n_query_tokens, arr.tail_gists.shape[1]), dtype=arr.tail_gists.dtype)
        emb[:q] = wc.tree.embeddings(0, np.arange(query.start, query.stop))
        arr.tail_gists = np.concatenate([arr.tail_gists, emb])
        arr.tail_levels = np.concatenate(
            [arr.tail_levels, np.where(np.arange(n_query_tokens) < q, 0, -1)]
        )
        arr.tail_mask = np.concatenate([arr.tail_mask, np.arange(n_query_tokens) < q])
    if probs is None:
        return arrays_to_item(arr)
    keystore.n_entry_features(1, feature_set)  # an unknown set fails here
    relative = feature_set in ("relative-lexical", "prior-lexical")
    feats = keystore.span_features(probs, wc.starts, wc.ends, wc.block_size, relative=relative)
    if relative:
        if block_lexical is None:
            raise ValueError(f"feature set {feature_set!r} needs the blocks' lexical relevance")
        lex = keystore.lexical_features(block_lexical, wc.starts, wc.ends, wc.block_size)
        feats = np.concatenate([feats, lex], axis=1)
    if feature_set == "prior-lexical":  # the BM25 baseline's scores, exactly (sim.policies.BM25)
        prior = bm25_prior(wc, block_lexical)
        feats = np.concatenate([feats, prior[:, None].astype(np.float32)], axis=1)
    return arrays_to_item(arr, feats)


def ranked_relevance_scores(wc: WorkingContext, block_rel: np.ndarray) -> np.ndarray:
    """(N,) the allocator scores a question-time baseline gives from any per-block relevance:
    ``relevance_scores`` of its ranks (``rank01``)."""
    return relevance_scores(wc, rank01(np.asarray(block_rel, dtype=np.float64)))


def bm25_prior(wc: WorkingContext, block_lexical: np.ndarray) -> np.ndarray:
    """(N,) the BM25 baseline's signed allocator scores of ``wc``'s entries from the blocks' BM25
    against the question (``ranked_relevance_scores``, as ``sim.policies.BM25`` scores them): the
    prior a 'prior-lexical' LensNet starts from."""
    return ranked_relevance_scores(wc, block_lexical)


class QueryTooLong(ValueError):
    """A task's question is longer than a LensNet's query inputs: an error in every entry point
    (the question is read whole or not at all)."""


def dense_relevance(
    block_hidden: np.ndarray, query_hidden: np.ndarray, centre: bool = True
) -> np.ndarray:
    """Cosine of each block's pooled state (n_l1, d) with the query's (d,), both first centred on
    the mean block vector when ``centre`` (removes the direction every block shares)."""
    k, q = np.asarray(block_hidden, np.float64), np.asarray(query_hidden, np.float64)
    if centre and len(k):
        mu = k.mean(axis=0)
        k, q = k - mu, q - mu
    return (k @ q) / (np.linalg.norm(k, axis=1) * np.linalg.norm(q) + 1e-12)


def bm25_relevance(block_text: list[str], query: str) -> np.ndarray:
    """Okapi BM25 score of each block's text against ``query`` (``bm25s``, English stop words,
    default k1 = 1.5, b = 0.75); all zeros when the query keeps no term."""
    import bm25s

    scores = np.zeros(len(block_text))
    if not block_text:
        return scores
    kw = dict(stopwords="en", show_progress=False)
    q = bm25s.tokenize([query], return_ids=False, **kw)[0]
    if not q:
        return scores
    index = bm25s.BM25()
    index.index(bm25s.tokenize(block_text, **kw), show_progress=False)
    return np.asarray(index.get_scores(q), dtype=np.float64)


def rank01(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (the largest value gets 1)."""
    if x.size <= 1:
        return np.ones_like(x, dtype=np.float64)
    return np.argsort(np.argsort(x, kind="stable"), kind="stable") / (x.size - 1)


def relevance_scores(wc: WorkingContext, block_rel: np.ndarray) -> np.ndarray:
    """Signed allocator scores from a relevance in [0, 1] per L1 block.

    A gist scores the best relevance among the blocks it covers (positive: expand the most
    relevant first); an L0 entry scores minus its block's relevance (the cost of giving it up:
    the least relevant detail pays first), less a tiny recency term so ties go oldest first.
    Tokens of the trailing partial block get relevance 1 (they are in the tail anyway).
    """
    padded = np.concatenate([np.asarray(block_rel, dtype=np.float64), [1.0]])
    rel = keystore.best_block(padded, wc.starts, wc.ends, wc.block_size)
    return np.where(wc.levels >= 1, rel, -rel) + 1e-6 * recency_scores(wc)


def rank_scores(wc: WorkingContext, u: np.ndarray) -> np.ndarray:
    """A scorer's order on the heuristics' scale (``relevance_scores``): gists get their rank among
    the gists in [0, 1] (the best 1), L0 entries minus their rank from the cheapest to give up in
    [-1, 0] (the cheapest 0), plus the same tiny recency tie-break. Keeps the order within each kind
    and drops the magnitudes, so the allocator's thresholds (in nats) no longer gate a scorer whose
    values are shrunk but whose order is right."""
    u = np.asarray(u, dtype=np.float64)
    out = np.empty_like(u)
    gist = wc.levels >= 1
    out[gist] = rank01(u[gist])
    out[~gist] = rank01(u[~gist]) - 1.0
    return out + 1e-6 * recency_scores(wc)
