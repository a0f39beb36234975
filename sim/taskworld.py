"""Long-context task worlds on the real LM (DESIGN.md §9): a task streamed through the MegaContext
tree to question time, and the question-time zoom every policy acts through.

A task is ``{"id", "context", "question", "answer", "needle_spans"}`` (``sim.tasks``). The stream
``context + question`` is tokenised once and ingested into the tree (gists from the world's
gister); the cursor then advances K tokens a step, each step's budget restored oldest first, so
every policy starts question time from the same recency cover (``PreparedTask.wc``; the
question stands in the L0 tail). At question time a policy (``sim.policies``) may refocus for up
to ``zoom_rounds`` rounds (rescore the current context, one allocator pass): an L2 gist needs two
rounds to reach L0, since its L1 children have no scores until they exist in the context. The
answer is then scored by ``sim.scoring``; the per-block features the heuristic baselines read
(block-alone hidden states and surprisal, the last token's attention per block) come from
``sim.features``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError, Gister, MegaContextTree, TreeConfig, mean_gister
from megacontext.working_context import BudgetExhausted, ContextConfig, WorkingContext
from sim import keystore
from sim.features import (
    ATTENTION_LAYERS,
    RETRIEVAL_DEPTH,
    answer_relevance,
    attention_layer_range,
    block_features,
    block_mass,
    bm25_relevance,
)
from sim.policy import FocusPolicy, FocusView


@dataclass(frozen=True)
class TaskWorldConfig:
    """Sizes of the task world: tree, budget, zoom."""

    block_size: int = 32
    """b: tokens per L1 gist, L1 gists per L2 gist."""
    max_level: int = 2
    """Top level of the tree (L2 = b**2 tokens)."""
    w_max: int = 192
    """W_max: slots of the working context."""
    tail_tokens: int = 64
    """R: the last R tokens stay at L0 while the stream runs (the question must fit in it)."""
    question_tail: bool = True
    """At question time only the question's own tokens stay protected at L0 (the tail shrinks
    from R to the question; tasks without a question keep R): the context blocks before it may
    then pay for the zoom's expands. False: R stays protected (then at W_max 192 a needle that
    straddles two blocks under an L2 gist cannot be fully opened: too few legal payers)."""
    step_tokens: int = 32
    """K: tokens ingested per stream step."""
    n_tail_gists: int = 6
    """Tail gists given to LensNet."""
    zoom_rounds: int = 0
    """Refocus rounds at question time; 0 = max_level (enough to descend from the top level to L0).
    """
    lookahead: bool = True
    """The oracle's (and the traces') expand gain of a level >= 2 gist sees two levels down."""
    retrieval_depth: float = RETRIEVAL_DEPTH
    """Dense retrieval baseline: hidden states at layer round(depth * n_layers) (0 = the embeddings;
    the default was chosen on training tasks, benchmarks/retrieval_layer.py)."""
    attention_layers: tuple[float, float] = ATTENTION_LAYERS
    """Attention baseline: the last token's attention is averaged over the layers
    range(round(lo * n_layers), round(hi * n_layers)) (at least one), [lo, hi] fractions of depth.
    """
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)

    @property
    def rounds(self) -> int:
        return self.zoom_rounds or self.max_level

    def __post_init__(self) -> None:
        if not 0.0 <= self.retrieval_depth <= 1.0:
            raise ConfigError(f"retrieval_depth must lie in [0, 1], got {self.retrieval_depth}")
        lo, hi = self.attention_layers
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(
                "attention_layers must be fractions 0 <= lo <= hi <= 1, "
                f"got {self.attention_layers}"
            )
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
    stream_snapshots: list[WorkingContext] = field(
        default_factory=list
    )  # covers at earlier cursors, if asked
    block_text: list[str] = field(
        default_factory=list
    )  # (n_l1,) the text of each complete L1 block
    query_text: str = ""  # the retrieval query: the question, or (no question) the L0 tail's text
    block_hidden: np.ndarray | None = None  # (n_l1, d) pooled hidden state of each block read alone
    block_surprisal: np.ndarray | None = None  # (n_l1,) mean token NLL of each block read alone
    query_hidden: np.ndarray | None = None  # (d,) pooled hidden state of the query read alone
    block_attention: np.ndarray | None = None  # (n_l1,) the last token's attention mass per block
    attention_probs: np.ndarray | None = None  # (L, H, n) the last token's attention per token
    answer_relevance: np.ndarray | None = None  # (n_l1,) the answer's attention per block (labels)
    attention_s: float = 0.0  # seconds the attention forward (and the cheap label) took
    block_lexical: np.ndarray | None = None  # (n_l1,) BM25 of each block against the query

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])


class CharTokenizer:
    """One token per character (id = code point mod ``vocab_size``), with offsets: for LMs without
    a tokenizer (the tiny random-init test LM)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(
        self, text: str, return_offsets_mapping: bool = False, add_special_tokens: bool = False
    ) -> dict:
        out = {"input_ids": [ord(c) % self.vocab_size for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def tokenize_task(
    task: dict, tokenizer
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    """(stream ids, answer ids, needle mask over the stream, question length in tokens, (n, 2)
    character offsets of each stream token in ``context + question``)."""
    text = task["context"] + task["question"]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    needle = np.zeros(len(ids), dtype=bool)
    for s, e in task.get("needle_spans") or []:
        needle |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
    answer = np.asarray(
        tokenizer(task["answer"], add_special_tokens=False)["input_ids"], dtype=np.int64
    )
    if answer.size == 0:
        raise TaskError(f"task {task.get('id')!r}: the answer tokenises to nothing")
    q_start = int(np.searchsorted(offsets[:, 0], len(task["context"])))
    return ids, answer, needle, len(ids) - q_start, offsets


def query_tokens(n_tokens: int, question_tokens: int, tail_tokens: int) -> slice:
    """The retrieval query's stream positions: the question, or the last ``tail`` tokens when the
    task has none (code continuation: the text being continued)."""
    return slice(n_tokens - (question_tokens or min(tail_tokens, n_tokens)), n_tokens)


def prepare_task(
    task: dict,
    oracle: LMOracle,
    tokenizer,
    config: TaskWorldConfig,
    gister: Gister = mean_gister,
    features: bool = True,
    stream_every: int = 0,
    attention: bool = False,
    answer_attention: bool = False,
) -> PreparedTask:
    """Tokenise, build the tree, stream the cursor to question time (recency restores), and (with
    ``features``) compute the block-alone hidden states and surprisal the heuristic baselines use;
    with ``attention``, the last token's attention over the whole stream (one more forward of the
    stream, ``sim.keystore``): per token (``attention_probs``, LensNet's attention features) and per
    block (``block_attention``, the attention baseline's); with ``answer_attention`` that forward
    also reads the answer teacher-forced after the stream and gives the cheap label's per-block
    relevance (``answer_relevance``, ``sim.features.answer_relevance``).
    ``stream_every`` > 0 keeps a copy of the cover every that many stream steps (stream-time
    labels)."""
    ids, answer, needle, q_len, offsets = tokenize_task(task, tokenizer)
    n = len(ids)
    if n + len(answer) > oracle.max_positions:
        raise TaskError(
            f"task {task.get('id')!r}: {n} + {len(answer)} tokens exceed the LM's "
            f"{oracle.max_positions} positions"
        )
    if q_len > config.tail_tokens:
        raise TaskError(
            f"task {task.get('id')!r}: the question ({q_len} tokens) is longer than the "
            f"L0 tail ({config.tail_tokens}); raise --world.tail-tokens"
        )
    b = config.block_size
    tree = MegaContextTree(
        TreeConfig(block_size=b, max_level=config.max_level, d_model=oracle.d_model),
        gister=gister,
        reserve_tokens=n,
    )
    tree.ingest(
        ids, oracle.token_embeddings(ids)
    )  # append-only: the same gists as streaming K at a time
    wc, snapshots = stream_cover(tree, n, q_len, config, stream_every, task.get("id"))
    text = task["context"] + task["question"]
    n_l1, query = n // b, query_tokens(n, q_len, config.tail_tokens)
    blocks = [text[offsets[j * b, 0] : offsets[(j + 1) * b - 1, 1]] for j in range(n_l1)]
    pt = PreparedTask(
        task, ids, answer, needle, q_len, wc, snapshots, blocks, text[offsets[query.start, 0] :]
    )
    pt.block_lexical = bm25_relevance(blocks, pt.query_text)
    if features:
        layer = round(config.retrieval_depth * oracle.model.config.num_hidden_layers)
        hidden, pt.block_surprisal, q_hidden = block_features(oracle, ids, b, ids[query], layer)
        pt.block_hidden, pt.query_hidden = hidden[0], q_hidden[0]
    if attention or answer_attention:
        layers = attention_layer_range(
            config.attention_layers, oracle.model.config.num_hidden_layers
        )
        # one forward: the stream (and, for the cheap label, the answer teacher-forced after it)
        t0 = time.perf_counter()
        read_ids = np.concatenate([ids, answer[:-1]]) if answer_attention else ids
        store = keystore.read(oracle, read_ids, b, n_queries=len(answer) if answer_attention else 1)
        probs = store.probs(0 if answer_attention else -1, n_keys=n)  # the last stream token's
        pt.attention_probs = probs.astype(np.float32)
        pt.block_attention = block_mass(probs[list(layers)], b)
        if answer_attention:
            pt.answer_relevance = answer_relevance(store, n, b)
        pt.attention_s = time.perf_counter() - t0
    return pt


def stream_cover(
    tree: MegaContextTree,
    n: int,
    question_tokens: int,
    config: TaskWorldConfig,
    stream_every: int = 0,
    task_id=None,
) -> tuple[WorkingContext, list[WorkingContext]]:
    """The question-time recency cover of the tree's first ``n`` tokens under ``config``'s budget:
    the cursor advances K tokens a step, each step's budget restored oldest first; then (with
    ``question_tail``) only the question stays protected. Also the covers every ``stream_every``
    steps (0: none). ``TaskError`` when the budget cannot hold the stream."""
    wc = WorkingContext(tree, ContextConfig(w_max=config.w_max, tail_tokens=config.tail_tokens))
    restore = FocusAllocator(config.allocator)
    snapshots: list[WorkingContext] = []
    try:
        while wc.n_tokens < n:
            wc.append_tokens(min(config.step_tokens, n - wc.n_tokens))
            restore.enforce_budget(wc)
            step = wc.n_tokens // config.step_tokens
            if stream_every and step % stream_every == 0 and wc.n_tokens < n - config.tail_tokens:
                snapshots.append(wc.copy())
    except BudgetExhausted as err:  # name the task; any other exception is a bug and propagates
        raise TaskError(f"task {task_id!r} ({n} tokens): {err}") from err
    if config.question_tail and question_tokens:
        wc.shrink_tail(question_tokens)
    return wc, snapshots


def with_budget(pt: PreparedTask, config: TaskWorldConfig) -> PreparedTask:
    """``pt`` at another budget (``config``'s W_max and tail; the same tree and per-block features):
    only the question-time cover is streamed again, so a W_max sweep computes each task's features
    once."""
    wc, _ = stream_cover(pt.wc.tree, pt.n_tokens, pt.question_tokens, config, 0, pt.task.get("id"))
    return replace(pt, wc=wc, stream_snapshots=[])


def zoom(
    policy: FocusPolicy, pt: PreparedTask, config: TaskWorldConfig, oracle: LMOracle
) -> tuple[WorkingContext, dict]:
    """Up to ``config.rounds`` refocus rounds from the question-time cover, each on ``policy``'s
    fresh scores of the current context; stops early when a round changes nothing. Returns the
    final context and counts (rounds, actions, seconds)."""
    wc = pt.wc.copy()
    # Cooldown is hysteresis between stream steps; the rounds share one cursor and R bounds any
    # thrash, so a round may give back detail an earlier round opened (with a cooldown, a marginal
    # round-1 expand can leave round 2 no payer for the block that matters).
    alloc = FocusAllocator(replace(config.allocator, cooldown=0))
    rounds = n_expand = n_collapse = 0
    t0 = time.perf_counter()
    for _ in range(config.rounds):
        view = FocusView(wc, config.n_tail_gists, oracle, pt.answer_ids, config.lookahead, pt)
        acts = alloc.step(wc, policy.scores(view))
        rounds += 1
        chosen = [a for a in acts if not a.forced]
        n_expand += sum(a.kind == "expand" for a in chosen)
        n_collapse += sum(a.kind == "collapse" for a in chosen)
        if not chosen:
            break
    wc.check_invariants()
    return wc, {
        "rounds": rounds,
        "expands": n_expand,
        "collapses": n_collapse,
        "policy_s": time.perf_counter() - t0,
        "slots": len(wc),
    }
