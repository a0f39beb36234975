"""The key store: the frozen LM's attention keys of the stream, kept per tree node as the stream is
read, and the attention features they give every working-context entry.

A block is read at L0 while it sits in the recency tail, so the LM's keys of its tokens are a
by-product of reading it: the store keeps them whole, per token and layer, so the LM's own softmax
is reproduced exactly (``bytes_per_token``: fp16). One mean key per L1 block (Landmark/MoBA-style,
1/b of the bytes) was measured against it and not adopted: ``benchmarks/keystore.py``.

At a refocus the newest token's queries (the last stream token: at question time the question's
last) score every stored key; per layer and head the softmax over all of them is the attention
mass each token (or block) receives, and an entry's mass is the sum over its span. Token 0 holds
the LM's attention sink, whose mass says nothing about content: it is left out and the rest
renormalised, and a separate feature flags the entry that holds it. ``span_features`` returns,
per entry and layer, the log mass (mean over heads), its largest head's, and its best L1 block's,
then the sink flag: what LensNet reads as extra per-entry inputs
(``LensNetConfig.n_entry_features``).

Two read modes (DESIGN §11; ``READ_MODES``):
- ``faithful`` (the default everywhere): what a deployed system computed while it ran. Each block's
  keys come from the forward in which the LM read it at L0, in the tail of the working context, with
  that context (gists included, at the context's own positions) as prefix (``stream_read``); the
  question's query from the LM's forward over the question-time working context
  (``question_query``), again at each zoom round over the refocused context.
- ``full-read`` (privileged, "what a full prefill would know"): one forward over the whole stream
  gives every key and the question's query (``read``); its query has already attended to the needle
  at full resolution. Reported only beside the faithful figures, and used for labels (supervision
  may read privileged information): with the task's answer appended (teacher forcing) the same
  forward yields the cheap labels' attention rows (``sim.taskworld.features.answer_relevance``).
With an unbounded working context the two are the same store (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError
from megacontext.working_context import WorkingContext

ReadMode = Literal["faithful", "full-read"]
READ_MODES: tuple[str, ...] = ("faithful", "full-read")
"""How question-time decisions read the LM: 'faithful' (only what the deployed system computed;
the default) or 'full-read' (privileged: one forward over the whole stream)."""
SINK_TOKENS = 1
"""Leading tokens whose attention is the LM's sink: token 0, and only it. Every attention mass the
project reads (the ``attention`` baseline, the cheap labels, LensNet's features) leaves it out and
renormalises the rest (``drop_sink``); the block that holds it is scored like any other."""


def drop_sink(probs: np.ndarray) -> np.ndarray:
    """(..., n) attention probabilities over stream tokens with the sink token(s) set to 0 and each
    row renormalised over the rest (float64)."""
    p = np.asarray(probs, dtype=np.float64).copy()
    p[..., :SINK_TOKENS] = 0.0
    return p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)


def check_read_mode(mode: str) -> str:
    """``mode`` if it is a read mode, else a ``ConfigError`` naming the choices."""
    if mode not in READ_MODES:
        raise ConfigError(f"unknown read mode {mode!r}; choose from {', '.join(READ_MODES)}")
    return mode


LOG_SCALE = 10.0
"""Log masses are divided by this, so features lie in about [-1.4, 0]."""


@dataclass
class KeyStore:
    """Per-layer keys of a stream (post-RoPE, one row per KV head) and the queries of its last
    positions, as ``read`` captured them."""

    keys: list[torch.Tensor]  # per layer (KVH, n, hd) float32: the stream's keys
    queries: torch.Tensor  # (L, H, q, hd) float32: the last q positions' queries
    n_tokens: int  # n: stream positions (keys)
    block_size: int
    scale: float  # attention logit scale (1/sqrt(hd))

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def _stacked(self) -> torch.Tensor:
        """(L, KVH, n, hd) every layer's keys in one tensor (built once)."""
        if getattr(self, "_stack", None) is None:
            self._stack = torch.stack(self.keys)
        return self._stack

    def bytes_per_token(self) -> float:
        """Bytes the store keeps per stream token (fp16 keys, all layers)."""
        kvh, _, hd = self.keys[0].shape
        return 2 * kvh * hd * self.n_layers

    # ---------------------------------------------------------------------------- attention
    def probs(self, row: int = -1, n_keys: int | None = None) -> np.ndarray:
        """(L, H, n_keys) the attention probabilities the query of position ``row`` (an index into
        the captured queries; -1 = the last) puts on each stream token 0..n_keys-1: the softmax
        runs over every key up to that position (causal), then only the first ``n_keys`` are
        returned (default: all of them). Every layer in one product, heads grouped onto their KV
        head."""
        n_q = self.queries.shape[2]
        pos = self.n_tokens - n_q + (row % n_q)  # the query's stream position
        n_causal = pos + 1
        n_keys = n_causal if n_keys is None else min(n_keys, n_causal)
        q = self.queries[:, :, row]  # (L, H, hd)
        k = self._stacked()[:, :, :n_causal]  # (L, KVH, n, hd)
        n_layers, kvh = k.shape[:2]
        qg = q.view(n_layers, kvh, q.shape[1] // kvh, q.shape[-1])  # (L, KVH, G, hd)
        logits = torch.einsum("lkgd,lknd->lkgn", qg, k) * self.scale
        p = torch.softmax(logits.double(), dim=-1).reshape(n_layers, q.shape[1], n_causal)
        return p[..., :n_keys].cpu().numpy()


def best_block(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, block_size: int
               ) -> np.ndarray:
    """(..., N) per span [starts, ends) the largest of ``values`` (..., n_blocks) over the L1 blocks
    the span touches (block i holds tokens [i b, (i + 1) b)); a span at or past the last block reads
    the last one, so a caller appends the trailing partial block's value there. The spans must tile
    the stream in order, as a working context's entries do (one reduceat: each gist's blocks run
    up to the next entry's first block; an L0 entry reads its own block). The one home of "an
    entry's best block" for the attention features, the lexical features and the heuristics'
    scores."""
    v = np.asarray(values)
    if len(starts) == 0:  # no spans: nothing to take the best of
        return np.zeros(v.shape[:-1] + (0,), dtype=v.dtype)
    top = v.shape[-1] - 1
    first = np.minimum(np.asarray(starts) // block_size, top)
    last = np.minimum(np.maximum((np.asarray(ends) - 1) // block_size, first), top)
    best = np.maximum.reduceat(v[..., : last[-1] + 1], first, axis=-1)
    return np.where(last > first, best, v[..., first])


def span_features(
    probs: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    block_size: int,
    relative: bool = False,
) -> np.ndarray:
    """(N, 3L + 1) float32 features of spans [starts, ends) from per-token probabilities
    (L, H, n), the sink token left out and the rest renormalised: per layer the span's mass (mean
    over heads), its largest head's mass, and the mass of the span's best L1 block (mean over
    heads; the trailing partial block counts as one block), each as log(1e-6 + mass) /
    ``LOG_SCALE``; then the sink flag. The best block is what the
    expand decision needs: a gist is worth opening when one of its blocks is attended to, which a
    span's total (spread over 1024 tokens for an L2 gist) does not show.

    ``relative``: each log mass less its largest value over the spans (per layer and kind), so a
    feature says how an entry compares with the rest of its context (0: the most attended), not
    how much mass there is to share: a 4k stream spreads its attention over twice the blocks of a
    2k one, and a scorer trained on absolute masses at one length misreads the other."""
    b = block_size
    n = int(ends[-1])
    p = drop_sink(np.asarray(probs)[..., :n])  # over the spans' tokens, sink left out
    cum = np.concatenate([np.zeros(p.shape[:-1] + (1,)), np.cumsum(p, axis=-1)], axis=-1)
    mass = cum[..., ends] - cum[..., starts]  # (L, H, N)
    edges = np.minimum(np.arange(0, n + b, b), n)
    block = np.diff(cum.mean(axis=1)[:, np.unique(edges)], axis=-1)  # (L, blocks) mean over heads
    best = best_block(block, starts, ends, b)
    logs = [np.log(1e-6 + m) / LOG_SCALE for m in (mass.mean(axis=1), mass.max(axis=1), best)]
    if relative:
        logs = [x - x.max(axis=1, keepdims=True) for x in logs]  # (L, N) each
    feats = np.concatenate([*logs, (starts < SINK_TOKENS)[None].astype(np.float64)])
    return feats.T.astype(np.float32)


def lexical_features(
    block_lex: np.ndarray, starts: np.ndarray, ends: np.ndarray, block_size: int
) -> np.ndarray:
    """(N, 2) lexical features of spans [starts, ends) from a lexical relevance per complete L1
    block (``block_lex`` (n_l1,) >= 0, e.g. BM25 against the question): the best of the span's
    blocks divided by the best of all blocks, and whether the span holds that best block. Spans in
    the trailing partial block get 0 (it has no score); all zeros when no block matches."""
    b = block_size
    lex = np.clip(np.asarray(block_lex, dtype=np.float64), 0.0, None)
    top = lex.max() if lex.size else 0.0
    out = np.zeros((len(starts), 2), dtype=np.float32)
    if top <= 0:
        return out
    best = best_block(np.append(lex / top, 0.0), starts, ends, b)  # the partial block: 0
    out[:, 0] = best
    out[:, 1] = best >= 1.0
    return out


FEATURE_SETS = ("attention", "relative-lexical", "prior-lexical")
"""LensNet's per-entry feature sets: 'attention' (``span_features``, absolute log masses),
'relative-lexical' (``span_features`` relative to the context, then ``lexical_features``) and
'prior-lexical' ('relative-lexical', then one column: the BM25 baseline's own signed allocator
score of the entry, ``sim.taskworld.features.relevance_scores`` of the blocks' BM25 ranks, which a
LensNet with ``prior='bm25'`` adds to its score: its starting point, ``PRIOR_COLUMN``)."""
PRIOR_COLUMN = -1
"""The prior's column in a 'prior-lexical' feature row: the last."""


def n_entry_features(n_layers: int, feature_set: str = "attention") -> int:
    """Width of a feature set's per-entry features for an LM of ``n_layers`` layers."""
    if feature_set not in FEATURE_SETS:
        raise ConfigError(f"unknown feature set {feature_set!r}; known: {', '.join(FEATURE_SETS)}")
    extra = {"attention": 0, "relative-lexical": 2, "prior-lexical": 3}[feature_set]
    return 3 * n_layers + 1 + extra


@torch.no_grad()
def _attention_inputs(
    oracle: LMOracle,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    lengths: list[int],
    n_queries: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One forward of right-padded rows ``embeds`` (B, S, d) at ``positions`` (B, S) whose first
    ``lengths[r]`` slots are real: per layer the post-RoPE keys of every slot (B, KVH, S, hd),
    and (``n_queries`` > 0) the post-RoPE queries of row 0's last ``n_queries`` real slots
    (L, H, q, hd), as the LM's attention uses them. Llama-family attention (``q_proj``/``k_proj``
    and a shared rotary embedding) only. Causal attention never lets a real slot see the padding
    to its right, so a row's keys do not depend on the other rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = oracle.model
    base = model.base_model
    cfg = model.config
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(layers[0].self_attn, "q_proj"):
        raise TypeError(f"the key store reads Llama-style attention; {type(model).__name__} is not")
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_rows, n_slots = embeds.shape[:2]
    last = slice(lengths[0] - n_queries, lengths[0])
    qs: list[torch.Tensor] = []
    ks: list[torch.Tensor] = []

    def keep_q(_m, _i, out):
        qs.append(out[0, last].float().view(n_queries, n_heads, hd).transpose(0, 1))

    def keep_k(_m, _i, out):
        ks.append(out.float().view(n_rows, n_slots, n_kv, hd).transpose(1, 2))

    mask = torch.zeros(n_rows, n_slots, dtype=torch.long, device=embeds.device)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    hooks = []
    try:
        for layer in layers:
            if n_queries:
                hooks.append(layer.self_attn.q_proj.register_forward_hook(keep_q))
            hooks.append(layer.self_attn.k_proj.register_forward_hook(keep_k))
        oracle.decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                       attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    cos, sin = base.rotary_emb(ks[0], positions)  # (B, S, hd)
    keys = [apply_rotary_pos_emb(k, k, cos, sin)[1] for k in ks]
    if not n_queries:
        return keys, None
    queries = [apply_rotary_pos_emb(q[None], q[None], cos[:1, last], sin[:1, last])[0][0]
               for q in qs]
    return keys, torch.stack(queries)


def _scale(oracle: LMOracle) -> float:
    cfg = oracle.model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return hd**-0.5


@torch.no_grad()
def read(oracle: LMOracle, ids: np.ndarray, block_size: int, n_queries: int = 1) -> KeyStore:
    """The *full read* (privileged: what a full prefill would know, DESIGN §11): one forward of
    the whole of ``ids`` through the LM, keeping every layer's keys of every position and the
    queries of the last ``n_queries`` positions (both post-RoPE). A deployed MegaContext system
    never runs it; the faithful store is ``stream_read`` + ``question_query``. Labels may use it
    (supervision, not decisions)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    n_queries = max(1, min(n_queries, n))
    x = oracle.embed(torch.as_tensor(ids, device=oracle.device)).to(oracle.dtype)[None]
    pos = torch.arange(n, device=oracle.device)[None]
    keys, queries = _attention_inputs(oracle, x, pos, [n], n_queries)
    return KeyStore([k[0] for k in keys], queries, n, block_size, _scale(oracle))


@dataclass(frozen=True)
class StreamRead:
    """One forward of the faithful stream read: the working context ``wc`` as the LM read it, whose
    last entries are the tokens [start, end) at L0 (the recency tail): their keys are kept."""

    wc: WorkingContext
    start: int
    end: int


@torch.no_grad()
def stream_read(
    oracle: LMOracle, reads: list[StreamRead], batch_size: int = 8, progress: str | None = None
) -> tuple[list[torch.Tensor], dict]:
    """The faithful key store of a stream (DESIGN §11): each token's keys come from the forward in
    which the LM read it at L0 in the tail of the working context, with that context (gists
    included, at its own positions) as prefix. ``reads`` must tile [0, n) in order. Returns per
    layer the keys (KVH, n, hd) and the cost (``positions``: positions run through the LM;
    ``forwards``; ``seconds``). ``progress``: a progress bar in stream tokens, with this label. A
    block's keys depend only on the context before it: the tree is append-only and each forward
    reads nothing after its ``end``."""
    t0 = time.perf_counter()
    if not reads or reads[0].start != 0:
        raise ValueError("stream reads must start at token 0")
    for a, b in zip(reads, reads[1:], strict=False):
        if a.end != b.start:
            raise ValueError(f"stream reads must tile the stream: [{a.start}, {a.end}) then "
                             f"[{b.start}, {b.end})")
    arrays = []
    for r in reads:
        wc = r.wc
        width = r.end - r.start
        if wc.n_tokens != r.end or width < 1 or not (
            np.all(wc.levels[-width:] == 0)
            and np.array_equal(wc.indices[-width:], np.arange(r.start, r.end))
        ):
            raise ValueError(f"tokens [{r.start}, {r.end}) are not the L0 end of their context")
        arrays.append(wc.arrays(0))
    order = sorted(range(len(reads)), key=lambda i: len(arrays[i].levels))  # similar lengths
    keys_out: list[torch.Tensor] = []  # per layer (KVH, n, hd), filled read by read: no copies
    positions = 0
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=reads[-1].end, desc=progress, unit="tok", unit_scale=True, leave=False)
    for s in range(0, len(order), batch_size):
        part = order[s : s + batch_size]
        lengths = [len(arrays[i].levels) for i in part]
        n_slots = max(lengths)
        embeds = torch.zeros(len(part), n_slots, oracle.d_model, dtype=oracle.dtype,
                             device=oracle.device)
        pos = torch.zeros(len(part), n_slots, dtype=torch.long, device=oracle.device)
        for row, i in enumerate(part):
            a = arrays[i]
            embeds[row, : lengths[row]] = torch.as_tensor(a.embeddings, device=oracle.device)
            p = torch.as_tensor(a.position_ids, device=oracle.device)
            pos[row, : lengths[row]] = p
            pos[row, lengths[row] :] = p[-1] + 1 + torch.arange(
                n_slots - lengths[row], device=oracle.device)
        keys, _ = _attention_inputs(oracle, embeds, pos, lengths)
        positions += sum(lengths)  # real positions (padding is the batching's, not the read's)
        if not keys_out:
            n = reads[-1].end
            keys_out = [k.new_empty((k.shape[1], n, k.shape[3])) for k in keys]
        for row, i in enumerate(part):
            r, width = reads[i], reads[i].end - reads[i].start
            for out, k in zip(keys_out, keys, strict=True):
                out[:, r.start : r.end] = k[row, :, lengths[row] - width : lengths[row]]
            if bar is not None:
                bar.update(width)
    if bar is not None:
        bar.close()
    cost = {"positions": positions, "forwards": len(reads), "seconds": time.perf_counter() - t0}
    return keys_out, cost


@torch.no_grad()
def question_query(oracle: LMOracle, wc: WorkingContext) -> torch.Tensor:
    """(L, H, 1, hd) the post-RoPE queries of the newest entry of ``wc`` (at question time: the
    question's last token) from one forward of the working context as the LM reads it: the
    question's query as a deployed system computes it, having read only ``wc``."""
    a = wc.arrays(0)
    x = torch.as_tensor(a.embeddings, device=oracle.device).to(oracle.dtype)[None]
    pos = torch.as_tensor(a.position_ids, device=oracle.device)[None]
    _, queries = _attention_inputs(oracle, x, pos, [len(a.levels)], n_queries=1)
    return queries


def faithful_store(
    oracle: LMOracle, keys: list[torch.Tensor], wc: WorkingContext, block_size: int
) -> KeyStore:
    """The store a deployed system holds at question time: the stream's keys (``stream_read``)
    and the question's query from its forward over ``wc`` (``question_query``)."""
    n = int(keys[0].shape[1])
    if wc.n_tokens != n:
        raise ValueError(f"the context covers {wc.n_tokens} tokens, the keys {n}")
    return KeyStore(keys, question_query(oracle, wc), n, block_size, _scale(oracle))
