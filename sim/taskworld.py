"""Long-context task worlds on the real LM (DESIGN.md §9): a task streamed through the MegaContext
tree, question-time zoom, and the focus policies users would pick instead of LensNet.

A task is ``{"id", "context", "question", "answer", "needle_spans"}`` (``sim.tasks``). The stream
``context + question`` is tokenised once and ingested into the tree (gists from the world's
gister); the cursor then advances K tokens a step, each step's budget restored oldest first, so
every policy starts question time from the same recency cover (``PreparedTask.wc``; the
question stands in the L0 tail). At question time a policy may refocus for up to ``zoom_rounds``
rounds (rescore the current context, one allocator pass): an L2 gist needs two rounds to reach
L0, since its L1 children have no scores until they exist in the context. The answer is then
scored as the continuation: mean NLL per answer token and exact match (teacher-forced argmax =
greedy decoding); focus recall = every needle token at L0 when the answer is scored.

Baselines, all through the same allocator and rounds (``relevance_scores`` turns a per-block
relevance in [0, 1] into the allocator's signed scores):
- ``recency``: restore oldest first, never expand;
- ``sinks``: StreamingLLM's attention sinks + recent window: the first block's path expands to L0;
- ``random``: uniform random block relevance;
- ``retrieval``: dense query-aware block retrieval from LM hidden states (MoBA's mean-pooled block
  key, on hidden states). Rule: every L1 block is read by the LM alone at ingest and its hidden
  states at layer ``round(retrieval_depth * n_layers)`` are mean-pooled without position 0 (where
  the LM puts its attention-sink activations); the query (the question's tokens, read alone, again
  without position 0; a task without a question, such as code continuation, uses the L0 tail's
  tokens) is pooled the same way; relevance = cosine, rank-normalised (``dense_relevance``). The
  layer (1 of 30 for SmolLM2) and whether to centre both sides first (no) were chosen on training
  tasks only (``benchmarks/retrieval_layer.py``, ``results/retrieval-layer-seed0``);
- ``bm25``: lexical retrieval, Okapi BM25 (the ``bm25s`` library, English stop words) of each L1
  block's text against the question's (or the tail's, as above), rank-normalised;
- ``surprisal``: LLMLingua-style: the block's mean token NLL when read alone, rank-normalised;
- ``oracle``: the exact greedy counterfactual labels (with the two-level lookahead for L2 gists,
  ``sim.labels.lookahead_contexts``) each round;
- ``full``: the whole stream as tokens (the LM's ceiling; only where it fits the LM's positions);
- ``lensnet``: a trained LensNet's scores (``lensnet.policy.LensNetPolicy``); ``lensnet_rank``: the
  same scores on the heuristics' rank scale (``rank_scores``).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sim.allocator import Action, AllocatorConfig, FocusAllocator, recency_scores
from sim.labels import label_snapshot
from sim.lm_oracle import LMOracle, answer_scores
from sim.tree import ConfigError, Gister, MegaContextTree, TreeConfig, mean_gister
from sim.working_context import BudgetExhausted, ContextConfig, WorkingContext

RETRIEVAL_DEPTH = 1 / 30
"""Dense retrieval's layer as a fraction of the LM's depth: layer 1 of SmolLM2's 30, the best mean
reciprocal rank of the needle block (0.62; hit@1 0.50) over 16 training tasks of the four kinds,
against 0.11 at layer 15 (``results/retrieval-layer-seed0``, ``benchmarks/retrieval_layer.py``)."""
RETRIEVAL_CENTRE = False
"""Whether dense retrieval centres both sides on the mean block vector: measured on the same training
tasks, centring lost at the chosen layer (MRR 0.55 against 0.62 uncentred)."""


@dataclass(frozen=True)
class TaskWorldConfig:
    """Sizes of the task world: tree, budget, zoom."""

    block_size: int = 32
    """b: tokens per L1 gist, L1 gists per L2 gist."""
    max_level: int = 2
    """Top level of the tree (L2 = b**2 tokens)."""
    w_max: int = 192
    """W_max: slots of the working context."""
    tail: int = 64
    """R: the last R tokens stay at L0 (the question must fit in it)."""
    step_tokens: int = 32
    """K: tokens ingested per stream step."""
    n_tail: int = 6
    """Tail gists given to LensNet."""
    zoom_rounds: int = 0
    """Refocus rounds at question time; 0 = max_level (enough to descend from the top level to L0)."""
    lookahead: bool = True
    """The oracle's (and the traces') expand gain of a level >= 2 gist sees two levels down."""
    retrieval_depth: float = RETRIEVAL_DEPTH
    """Dense retrieval baseline: hidden states at layer round(depth * n_layers) (0 = the embeddings; the default was chosen on training tasks, benchmarks/retrieval_layer.py)."""
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)

    @property
    def rounds(self) -> int:
        return self.zoom_rounds or self.max_level

    def __post_init__(self) -> None:
        if not 0.0 <= self.retrieval_depth <= 1.0:
            raise ConfigError(f"retrieval_depth must lie in [0, 1], got {self.retrieval_depth}")
        if self.zoom_rounds < 0:
            raise ConfigError(f"zoom_rounds must be >= 0, got {self.zoom_rounds}")
        if self.step_tokens < 1:
            raise ConfigError(f"step_tokens must be >= 1, got {self.step_tokens}")


class TaskError(ValueError):
    """A task that cannot run: too long for the LM's positions or the budget, empty answer..."""


@dataclass
class PreparedTask:
    """One task streamed to question time: what every policy starts from."""

    task: dict
    ids: np.ndarray  # (n,) stream token ids (context + question)
    answer_ids: np.ndarray  # (h,)
    needle: np.ndarray  # (n,) bool: token overlaps a needle span
    question_tokens: int
    wc: WorkingContext  # the recency cover at question time (copy it before refocusing)
    stream_snapshots: list[WorkingContext] = field(default_factory=list)  # covers at earlier cursors, if asked
    block_text: list[str] = field(default_factory=list)  # (n_l1,) the text of each complete L1 block
    query_text: str = ""  # the retrieval query: the question, or (no question) the L0 tail's text
    block_hidden: np.ndarray | None = None  # (n_l1, d) pooled hidden state of each block read alone
    block_surprisal: np.ndarray | None = None  # (n_l1,) mean token NLL of each block read alone
    query_hidden: np.ndarray | None = None  # (d,) pooled hidden state of the query read alone

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])


class CharTokenizer:
    """One token per character (id = code point mod ``vocab_size``), with offsets: for LMs without
    a tokenizer (the tiny random-init test LM)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, return_offsets_mapping: bool = False, add_special_tokens: bool = False) -> dict:
        out = {"input_ids": [ord(c) % self.vocab_size for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def tokenize_task(task: dict, tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    """(stream ids, answer ids, needle mask over the stream, question length in tokens, (n, 2)
    character offsets of each stream token in ``context + question``)."""
    text = task["context"] + task["question"]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    needle = np.zeros(len(ids), dtype=bool)
    for s, e in task.get("needle_spans") or []:
        needle |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
    answer = np.asarray(tokenizer(task["answer"], add_special_tokens=False)["input_ids"], dtype=np.int64)
    if answer.size == 0:
        raise TaskError(f"task {task.get('id')!r}: the answer tokenises to nothing")
    q_start = int(np.searchsorted(offsets[:, 0], len(task["context"])))
    return ids, answer, needle, len(ids) - q_start, offsets


def query_tokens(n_tokens: int, question_tokens: int, tail: int) -> slice:
    """The retrieval query's stream positions: the question, or the last ``tail`` tokens when the
    task has none (code continuation: the text being continued)."""
    return slice(n_tokens - (question_tokens or min(tail, n_tokens)), n_tokens)


def prepare_task(task: dict, oracle: LMOracle, tokenizer, config: TaskWorldConfig,
                 gister: Gister = mean_gister, features: bool = True, stream_every: int = 0) -> PreparedTask:
    """Tokenise, build the tree, stream the cursor to question time (recency restores), and (with
    ``features``) compute the block-alone hidden states and surprisal the heuristic baselines use.
    ``stream_every`` > 0 keeps a copy of the cover every that many stream steps (stream-time labels)."""
    ids, answer, needle, q_len, offsets = tokenize_task(task, tokenizer)
    n = len(ids)
    if n + len(answer) > oracle.max_positions:
        raise TaskError(f"task {task.get('id')!r}: {n} + {len(answer)} tokens exceed the LM's "
                        f"{oracle.max_positions} positions")
    if q_len > config.tail:
        raise TaskError(f"task {task.get('id')!r}: the question ({q_len} tokens) is longer than the "
                        f"L0 tail ({config.tail}); raise --tail")
    b = config.block_size
    tree = MegaContextTree(TreeConfig(block_size=b, max_level=config.max_level, d_model=oracle.d_model),
                           gister=gister, reserve_tokens=n)
    tree.ingest(ids, oracle.token_embeddings(ids))  # append-only: the same gists as streaming K at a time
    wc = WorkingContext(tree, ContextConfig(w_max=config.w_max, tail=config.tail))
    restore = FocusAllocator(config.allocator)
    snapshots: list[WorkingContext] = []
    try:
        while wc.n_tokens < n:
            wc.append_tokens(min(config.step_tokens, n - wc.n_tokens))
            restore.enforce_budget(wc)
            step = wc.n_tokens // config.step_tokens
            if stream_every and step % stream_every == 0 and wc.n_tokens < n - config.tail:
                snapshots.append(wc.copy())
    except BudgetExhausted as err:  # name the task; any other exception is a bug and propagates
        raise TaskError(f"task {task.get('id')!r} ({n} tokens): {err}") from err
    text = task["context"] + task["question"]
    n_l1, query = n // b, query_tokens(n, q_len, config.tail)
    blocks = [text[offsets[j * b, 0] : offsets[(j + 1) * b - 1, 1]] for j in range(n_l1)]
    pt = PreparedTask(task, ids, answer, needle, q_len, wc, snapshots, blocks, text[offsets[query.start, 0] :])
    if features:
        layer = round(config.retrieval_depth * oracle.model.config.num_hidden_layers)
        hidden, pt.block_surprisal, q_hidden = block_features(oracle, ids, b, ids[query], layer)
        pt.block_hidden, pt.query_hidden = hidden[0], q_hidden[0]
    return pt


@torch.no_grad()
def block_features(oracle: LMOracle, ids: np.ndarray, b: int, query_ids: np.ndarray, layers: int | list[int],
                   chunk: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each complete L1 block read by the LM alone, and the query read alone: (block hidden states at
    each of ``layers``, mean-pooled over positions 1.. (L, n_l1, d); the blocks' mean token NLL
    (n_l1,); the query's hidden states pooled the same way (L, d)). Position 0 of a sequence read
    alone holds the LM's attention-sink activations, shared by every block: it is left out."""
    model = oracle.model
    layers = [layers] if isinstance(layers, int) else list(layers)
    n_l1 = len(ids) // b
    blocks = torch.as_tensor(ids[: n_l1 * b].reshape(n_l1, b), device=oracle.device)
    hidden, surprisal = [], []
    for s in range(0, n_l1, chunk):
        x = blocks[s : s + chunk]
        out = model(input_ids=x, output_hidden_states=True, use_cache=False)
        hidden.append(torch.stack([out.hidden_states[k][:, 1:].float().mean(dim=1) for k in layers]).cpu())
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
        surprisal.append(ce.mean(dim=1).cpu())
    q = torch.as_tensor(query_ids, device=oracle.device)[None]
    states = model(input_ids=q, output_hidden_states=True, use_cache=False).hidden_states
    q_hidden = torch.stack([states[k][0, 1:].float().mean(dim=0) if q.shape[1] > 1 else states[k][0, 0].float()
                            for k in layers]).cpu()
    d = oracle.d_model
    return (torch.cat(hidden, dim=1).numpy() if hidden else np.zeros((len(layers), 0, d), np.float32),
            torch.cat(surprisal).numpy() if surprisal else np.zeros(0, np.float32), q_hidden.numpy())


def dense_relevance(block_hidden: np.ndarray, query_hidden: np.ndarray, centre: bool = True) -> np.ndarray:
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


def _rank01(x: np.ndarray) -> np.ndarray:
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
    b = wc.block_size
    first = wc.starts // b  # first L1 block of each entry
    last = np.maximum((wc.ends - 1) // b, first)
    padded = np.concatenate([np.asarray(block_rel, dtype=np.float64), [1.0]])
    first, last = np.minimum(first, len(block_rel)), np.minimum(last, len(block_rel))
    # max over each entry's block range: entries tile the stream in order (a context invariant), so
    # each range runs up to the next entry's first block (or is that block itself, for L0 entries
    # sharing it)
    rel = np.maximum.reduceat(padded[: last[-1] + 1], first)
    rel = np.where(last > first, rel, padded[first])
    return np.where(wc.levels >= 1, rel, -rel) + 1e-6 * recency_scores(wc)


class ZoomPolicy:
    """A question-time policy: ``scores(pt, wc)`` for the current context; ``None`` = do nothing."""

    name = "base"
    needs_features = False

    def scores(self, pt: PreparedTask, wc: WorkingContext) -> np.ndarray | None:
        raise NotImplementedError


class RecencyZoom(ZoomPolicy):
    name = "recency"

    def scores(self, pt, wc):
        return recency_scores(wc)


class SinksZoom(ZoomPolicy):
    """StreamingLLM: the first ``n_sink_blocks`` blocks (the attention sinks) expand to L0."""

    name = "sinks"

    def __init__(self, n_sink_blocks: int = 1) -> None:
        self.n = n_sink_blocks

    def scores(self, pt, wc):
        rel = np.zeros(pt.n_tokens // wc.block_size)
        rel[: self.n] = 1.0
        return relevance_scores(wc, rel)


class RandomZoom(ZoomPolicy):
    name = "random"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def scores(self, pt, wc):
        rng = np.random.default_rng([self.seed, zlib.crc32(str(pt.task["id"]).encode())])
        return relevance_scores(wc, rng.random(pt.n_tokens // wc.block_size))


class RetrievalZoom(ZoomPolicy):
    """Dense retrieval: the cosine of the query's and each block's pooled hidden state (centred when
    ``RETRIEVAL_CENTRE``)."""

    name = "retrieval"
    needs_features = True

    def relevance(self, pt: PreparedTask) -> np.ndarray:
        """(n_l1,) the query's cosine with each block."""
        return dense_relevance(pt.block_hidden, pt.query_hidden, RETRIEVAL_CENTRE)

    def scores(self, pt, wc):
        return relevance_scores(wc, _rank01(self.relevance(pt)))


class BM25Zoom(ZoomPolicy):
    """Lexical retrieval: BM25 of each block's text against the question (``bm25_relevance``)."""

    name = "bm25"

    def relevance(self, pt: PreparedTask) -> np.ndarray:
        """(n_l1,) each block's BM25 score against the query."""
        return bm25_relevance(pt.block_text, pt.query_text)

    def scores(self, pt, wc):
        return relevance_scores(wc, _rank01(self.relevance(pt)))


class SurprisalZoom(ZoomPolicy):
    name = "surprisal"
    needs_features = True

    def scores(self, pt, wc):
        return relevance_scores(wc, _rank01(pt.block_surprisal))


class OracleZoom(ZoomPolicy):
    """The exact greedy counterfactual labels of the answer, every round."""

    name = "oracle"

    def __init__(self, oracle: LMOracle, n_tail: int = 6, lookahead: bool = True, doc_id: int = 0,
                 keep: bool = False) -> None:
        self.oracle, self.n_tail, self.lookahead, self.doc_id = oracle, n_tail, lookahead, doc_id
        self.keep = keep
        self.snapshots: list[dict] = []  # with ``keep``: every round's labelled snapshot (the traces)

    def scores(self, pt, wc):
        labels = label_snapshot(wc, self.oracle, pt.answer_ids, wc.n_tokens, self.n_tail, self.doc_id,
                                self.lookahead)
        if self.keep:
            self.snapshots.append(labels)
        return labels["target_utilities"].astype(np.float64)


def rank_scores(wc: WorkingContext, u: np.ndarray) -> np.ndarray:
    """A scorer's order on the heuristics' scale (``relevance_scores``): gists get their rank among
    the gists in [0, 1] (the best 1), L0 entries minus their rank from the cheapest to give up in
    [-1, 0] (the cheapest 0), plus the same tiny recency tie-break. Keeps the order within each kind
    and drops the magnitudes, so the allocator's thresholds (in nats) no longer gate a scorer whose
    values are shrunk but whose order is right."""
    u = np.asarray(u, dtype=np.float64)
    out = np.empty_like(u)
    gist = wc.levels >= 1
    out[gist] = _rank01(u[gist])
    out[~gist] = _rank01(u[~gist]) - 1.0
    return out + 1e-6 * recency_scores(wc)


class LensNetZoom(ZoomPolicy):
    """A trained LensNet's scores; ``rank=True`` (policy ``lensnet_rank``) passes them through
    ``rank_scores`` first, the scale the heuristic baselines act on."""

    def __init__(self, lensnet_policy, n_tail: int = 6, rank: bool = False) -> None:
        self.policy, self.n_tail, self.rank = lensnet_policy, n_tail, rank
        self.name = "lensnet_rank" if rank else "lensnet"

    def scores(self, pt, wc):
        u = self.policy.scores(wc.arrays(self.n_tail))
        return rank_scores(wc, u) if self.rank else u


def zoom(policy: ZoomPolicy, pt: PreparedTask, config: TaskWorldConfig) -> tuple[WorkingContext, dict]:
    """Up to ``config.rounds`` refocus rounds from the question-time cover; stops early when a round
    changes nothing. Returns the final context and counts (rounds, actions, seconds)."""
    wc = pt.wc.copy()
    # Cooldown is hysteresis between stream steps; the rounds share one cursor and R bounds any
    # thrash, so a round may give back detail an earlier round opened (measured: with cooldown 2,
    # a marginal round-1 expand left round 2 no payer for the needle block the oracle found).
    alloc = FocusAllocator(replace(config.allocator, cooldown=0))
    rounds = n_expand = n_collapse = 0
    t0 = time.perf_counter()
    actions: list[Action] = []
    for _ in range(config.rounds):
        u = policy.scores(pt, wc)
        acts = alloc.step(wc, u)
        rounds += 1
        chosen = [a for a in acts if not a.forced]
        actions += chosen
        n_expand += sum(a.kind == "expand" for a in chosen)
        n_collapse += sum(a.kind == "collapse" for a in chosen)
        if not chosen:
            break
    wc.check_invariants()
    return wc, {"rounds": rounds, "expands": n_expand, "collapses": n_collapse,
                "policy_s": time.perf_counter() - t0, "slots": len(wc)}


def focus_recall(pt: PreparedTask, wc: WorkingContext) -> bool | None:
    """Every needle token at L0 in ``wc`` (None when the task names no needle)."""
    if not pt.needle.any():
        return None
    l0 = np.zeros(pt.n_tokens, dtype=bool)
    l0[wc.starts[wc.levels == 0]] = True
    return bool(np.all(l0[pt.needle]))


def needle_level(pt: PreparedTask, wc: WorkingContext | None = None) -> int | None:
    """The highest level among the entries of ``wc`` (default: the question-time recency cover)
    that cover a needle token: 2 = the needle sat under an L2 gist (None without a needle)."""
    if not pt.needle.any():
        return None
    wc = pt.wc if wc is None else wc
    level = np.repeat(wc.levels, wc.ends - wc.starts)  # per stream token, the level of its entry
    return int(level[: pt.n_tokens][pt.needle].max())


def answer_task(policy: ZoomPolicy | str, pt: PreparedTask, oracle: LMOracle, config: TaskWorldConfig) -> dict:
    """One row of results: the policy's answer NLL, exact match, focus recall, rounds and actions."""
    if policy == "full":
        nll, em = answer_scores(oracle, None, pt.answer_ids, prefix_ids=pt.ids)
        return {"answer_nll": nll, "exact_match": float(em), "focus_recall": None if not pt.needle.any() else True,
                "rounds": 0, "expands": 0, "collapses": 0, "slots": pt.n_tokens, "policy_s": 0.0}
    wc, info = zoom(policy, pt, config)
    t0 = time.perf_counter()
    nll, em = answer_scores(oracle, wc.arrays(config.n_tail), pt.answer_ids)
    return {"answer_nll": nll, "exact_match": float(em), "focus_recall": focus_recall(pt, wc), **info,
            "lm_forward_s": time.perf_counter() - t0, "focus_map": wc.focus_map(200)}
