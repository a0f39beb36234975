"""Long-context task worlds on the real LM (DESIGN.md §9): a task streamed through the MegaContext
tree to question time, and the question-time zoom every policy acts through.

A task is ``{"id", "context", "question", "answer", "needle_spans"}`` (``sim.tasks``). The stream
``context + question`` is tokenised once and ingested into the tree (gists from the world's
gister); the cursor then advances K tokens a step, each step's budget restored oldest first, so
every policy starts question time from the same recency cover (``PreparedTask.wc``; the
question stands in the L0 tail). At question time a policy (``sim.policies``) may refocus for up
to ``zoom_rounds`` rounds (rescore the current context, one allocator pass): an L2 gist needs two
rounds to reach L0, since its L1 children have no scores until they exist in the context. The
answer is then scored by ``sim.taskworld.scoring``; the per-block features the heuristic baselines
read (block-alone hidden states and surprisal, the last token's attention per block) come from
``sim.taskworld.features``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError, Gister, MegaContextTree, TreeConfig, mean_gister
from megacontext.working_context import BudgetExhausted, ContextConfig, WorkingContext
from sim.policy import FocusPolicy, FocusView
from sim.taskworld import keystore
from sim.taskworld.features import (
    ATTENTION_LAYERS,
    RETRIEVAL_DEPTH,
    answer_relevance,
    block_features,
    block_mass,
    bm25_relevance,
)


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
    attention_layers: tuple[float, float] | None = None
    """Attention baseline: the last token's attention is averaged over the layers
    range(round(lo * n_layers), round(hi * n_layers)) (at least one), [lo, hi] fractions of depth;
    unset: the window chosen on training tasks for the read mode (``ATTENTION_LAYERS``)."""
    read_mode: str = "faithful"
    """What question-time decisions may read (DESIGN §11, ``sim.taskworld.keystore.READ_MODES``):
    'faithful' (keys from the stream as the working context read it, the question's query from the
    question-time context; the default) or 'full-read' (privileged: one forward over the whole
    stream, what a full prefill would know; report it only beside the faithful figures)."""
    read_tokens: int = 0
    """Faithful mode: tokens each stream forward reads at the end of the working context (their
    keys are kept); 0 = the L0 tail (R). At most R, so the read tokens stand at L0."""
    context_query_tokens: int = 32
    """A task without a question (code continuation): its query is the stream's last this many
    tokens (the text being continued), for every policy that reads a query."""
    position_mode: str = "slot"
    """The positions the LM reads the working context at (``ContextConfig.position_mode``): 'slot'
    (each entry its slot, StreamingLLM's rule: never past W_max, so streams of any length run) or
    'centre' (each entry its span's centre in the stream: only streams within the LM's window)."""
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)

    @property
    def rounds(self) -> int:
        return self.zoom_rounds or self.max_level

    @property
    def attention_window(self) -> tuple[float, float]:
        """The attention baseline's layer window: ``attention_layers``, or the read mode's."""
        return self.attention_layers or ATTENTION_LAYERS[self.read_mode]

    @property
    def stream_read_tokens(self) -> int:
        return self.read_tokens or self.tail_tokens

    def __post_init__(self) -> None:
        if not 0.0 <= self.retrieval_depth <= 1.0:
            raise ConfigError(f"retrieval_depth must lie in [0, 1], got {self.retrieval_depth}")
        keystore.check_read_mode(self.read_mode)
        if not 0 <= self.read_tokens <= self.tail_tokens or not (
            self.read_tokens or self.tail_tokens
        ):
            raise ConfigError(
                f"read_tokens must lie in [0, tail_tokens={self.tail_tokens}] (0 = the tail, "
                f"which must then be >= 1), got {self.read_tokens}"
            )
        if self.read_mode == "faithful" and self.step_tokens > self.stream_read_tokens:
            raise ConfigError(
                f"the faithful read needs step_tokens ({self.step_tokens}) <= read_tokens "
                f"({self.stream_read_tokens}; 0 = tail_tokens): each stream forward reads the "
                "tokens that arrived since the last one, all in the L0 tail"
            )
        if self.context_query_tokens < 1:
            raise ConfigError(
                f"context_query_tokens must be >= 1, got {self.context_query_tokens}"
            )
        lo, hi = self.attention_window
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(
                "attention_layers must be fractions 0 <= lo <= hi <= 1, "
                f"got {self.attention_layers}"
            )
        if self.zoom_rounds < 0:
            raise ConfigError(f"zoom_rounds must be >= 0, got {self.zoom_rounds}")
        if self.step_tokens < 1:
            raise ConfigError(f"step_tokens must be >= 1, got {self.step_tokens}")
        if self.position_mode not in ("slot", "centre"):
            raise ConfigError(
                f"position_mode must be 'slot' or 'centre', got {self.position_mode!r}"
            )


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
    query: slice = field(default_factory=lambda: slice(0, 0))  # the question, exactly
    stream_snapshots: list[WorkingContext] = field(
        default_factory=list
    )  # covers at earlier cursors, if asked
    block_text: list[str] = field(
        default_factory=list
    )  # (n_l1,) the text of each complete L1 block, the query's own tokens left out
    query_text: str = ""  # the retrieval query's text (``query``)
    block_hidden: np.ndarray | None = None  # (n_l1, d) pooled hidden state of each block read alone
    block_surprisal: np.ndarray | None = None  # (n_l1,) mean token NLL of each block read alone
    query_hidden: np.ndarray | None = None  # (d,) pooled hidden state of the query read alone
    read_mode: str = "faithful"  # what attention inputs read (keystore.READ_MODES)
    attention_probs: np.ndarray | None = None  # (L, H, n) the question's attention, question time
    stream_keys: list | None = None  # faithful: per layer (KVH, n, hd) keys of the stream read
    read_cost: dict = field(default_factory=dict)  # the attention read's positions and seconds
    answer_relevance: np.ndarray | None = None  # (n_l1,) the answer's attention per block (labels)
    attention_s: float = 0.0  # seconds the attention forwards (and the cheap label) took
    label_s: float = 0.0  # of which the cheap label's full read (``answer_attention``)
    block_lexical: np.ndarray | None = None  # (n_l1,) BM25 of each block against the query
    window: int | None = None  # the LM's positions where stream + answer exceed them, else None
    _attention: dict = field(default_factory=dict, repr=False)  # cover -> (attention, seconds)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    def read_faithfully(
        self, oracle: LMOracle, reads: list[keystore.StreamRead], progress: str | None = None
    ) -> float:
        """The faithful read of this task: the stream's keys from ``reads`` (``stream_cover``'s,
        for ``self.wc``'s budget) and the question's attention over them from the question-time
        cover (``stream_keys``, ``attention_probs``, ``read_cost``). Returns its seconds.
        ``progress``: a progress bar of the stream read, with this label."""
        t0 = time.perf_counter()
        self.stream_keys, self.read_cost = keystore.stream_read(oracle, reads, progress=progress)
        store = keystore.faithful_store(oracle, self.stream_keys, self.wc, self.wc.block_size)
        self.attention_probs = store.probs(-1).astype(np.float32)
        self.read_cost["positions"] += len(self.wc)  # the question-time forward
        self.read_cost["seconds"] = time.perf_counter() - t0
        return self.read_cost["seconds"]

    def question_attention(self, wc: WorkingContext, oracle: LMOracle) -> np.ndarray:
        """(L, H, n) the attention of the question's last token over the stream's keys when the
        LM reads the working context ``wc`` (a cover of this task at question time). Faithful: the
        query from one forward over ``wc`` (each zoom round reads its own context; cached per
        cover), the keys from the stream read. Full read: the one forward over the whole stream,
        whatever ``wc`` is."""
        faithful = self.read_mode == "faithful"
        if (self.stream_keys if faithful else self.attention_probs) is None:
            raise ValueError("this task was prepared without attention: "
                             "prepare_task(..., attention=True)")
        if not faithful or (self.attention_probs is not None and _same_cover(wc, self.wc)):
            return self.attention_probs
        key = (wc.levels.tobytes(), wc.indices.tobytes())
        if key not in self._attention:
            t0 = time.perf_counter()
            store = keystore.faithful_store(oracle, self.stream_keys, wc, wc.block_size)
            self._attention[key] = (store.probs(-1).astype(np.float32), time.perf_counter() - t0)
        probs, seconds = self._attention[key]
        self.attention_s += seconds  # each reader pays for the forward, cached or not
        return probs

    def block_attention(
        self, wc: WorkingContext, oracle: LMOracle, layers: range | list[int]
    ) -> np.ndarray:
        """(n_l1,) the attention baseline's relevance: the question's attention mass
        (``question_attention``) on each complete L1 block, averaged over every head of
        ``layers``, with the sink token left out (``sim.taskworld.keystore.drop_sink``): a block is
        scored on its content, block 0 included."""
        probs = self.question_attention(wc, oracle)[list(layers)]
        return block_mass(keystore.drop_sink(probs), wc.block_size)


def _same_cover(a: WorkingContext, b: WorkingContext) -> bool:
    return np.array_equal(a.levels, b.levels) and np.array_equal(a.indices, b.indices)


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


@dataclass
class Reader:
    """What reads a task stream: the frozen LM, its tokenizer, its oracle and the world's gister
    (``load_reader``)."""

    model: object
    """The causal LM."""
    tokenizer: object
    """The tokenizer tasks are read with (a ``CharTokenizer`` for an LM without one)."""
    own_tokenizer: object | None
    """The LM's own tokenizer (None for the tiny test LM): what counts task lengths."""
    oracle: LMOracle
    gister: Gister
    gister_name: str
    """The gister ``gistnet.gister.resolve_gister`` chose, as results record it."""


def load_reader(lm: str, gister: str, block_size: int, dtype=None) -> Reader:
    """The one home of "load the LM and its gister" for every entry point that reads a real LM
    (the task entry points, ``sim.run --env lm``, the env): ``lm`` as ``megacontext.lm.load_lm``
    names it (``dtype``: None for its default), ``gister`` as ``gistnet.gister.resolve_gister``
    does."""
    from gistnet.gister import resolve_gister
    from megacontext.lm import load_lm

    model, own = load_lm(lm, dtype=dtype)
    oracle = LMOracle(model)
    g, name = resolve_gister(gister, model, block_size)
    return Reader(model, own or CharTokenizer(model.config.vocab_size), own, oracle, g, name)


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


def query_span(n_tokens: int, question_tokens: int, config: TaskWorldConfig) -> slice:
    """The query's stream positions, the same for every reader (BM25, dense retrieval, LensNet):
    exactly the task's question, or, for a task without one (code continuation), the stream's last
    ``config.context_query_tokens`` tokens (the text being continued)."""
    width = question_tokens or min(config.context_query_tokens, n_tokens)
    return slice(n_tokens - width, n_tokens)


def check_query_fits(pt: PreparedTask, limit: int, reader: str = "LensNet") -> None:
    """A ``TaskError`` when ``pt``'s query (its question, exactly) is longer than the ``limit``
    query inputs of ``reader``: the one check of every entry point (``sim.evaluate``,
    ``sim.tasklabels``, ``sim.tasktrain``'s calibration), never a question cut to fit."""
    width = pt.query.stop - pt.query.start
    if width > limit:
        raise TaskError(
            f"task {pt.task.get('id')!r}: the question ({width} tokens) is longer than "
            f"{reader}'s {limit} query inputs"
        )


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
    surprisal: bool = True,
    progress: bool = False,
) -> PreparedTask:
    """Tokenise, build the tree, stream the cursor to question time (recency restores), and (with
    ``features``) compute the block-alone hidden states and surprisal the heuristic baselines use;
    with ``attention``, the question's attention over the stream in ``config.read_mode``
    (``attention_probs``; later covers through ``PreparedTask.question_attention``): faithful, the
    stream's keys as the working context read them (one forward per ``read_tokens``, kept in
    ``stream_keys``) and the question's query from the question-time cover; full read, one forward
    of the whole stream. ``answer_attention`` (labels: privileged by design) also runs the full
    read with the answer teacher-forced after the stream and gives the cheap label's per-block
    relevance (``answer_relevance``, ``sim.taskworld.features.answer_relevance``); in full-read mode
    that one forward serves both. ``stream_every`` > 0 keeps a copy of the cover every that many
    stream steps (stream-time labels). Without ``surprisal`` the features hold the hidden states
    alone (``block_surprisal`` None): their forwards stop at the retrieval layer. ``progress``: a
    progress bar over the faithful stream read (minutes for a stream far past the window)."""
    ids, answer, needle, q_len, offsets = tokenize_task(task, tokenizer)
    n = len(ids)
    whole = ("labels" if answer_attention
             else "full-read" if attention and config.read_mode != "faithful" else None)
    beyond = _check_fits(task, n, len(answer), q_len, oracle, config, whole)
    b = config.block_size
    tree = MegaContextTree(
        TreeConfig(block_size=b, max_level=config.max_level, d_model=oracle.d_model),
        gister=gister,
        reserve_tokens=n,
    )
    tree.ingest(
        ids, oracle.token_embeddings(ids)
    )  # append-only: the same gists as streaming K at a time
    faithful = attention and config.read_mode == "faithful"
    wc, snapshots, reads = stream_cover(tree, n, q_len, config, stream_every, task.get("id"),
                                        record_reads=faithful)
    query = query_span(n, q_len, config)
    blocks, query_text = _block_texts(task, offsets, n, b, query)
    pt = PreparedTask(task, ids, answer, needle, q_len, wc, query, snapshots, blocks, query_text,
                      read_mode=config.read_mode, window=oracle.max_positions if beyond else None)
    pt.block_lexical = bm25_relevance(blocks, pt.query_text)
    if features:
        layer = round(config.retrieval_depth * oracle.model.config.num_hidden_layers)
        hidden, pt.block_surprisal, q_hidden = block_features(oracle, ids, b, ids[query], layer,
                                                              surprisal=surprisal)
        pt.block_hidden, pt.query_hidden = hidden[0], q_hidden[0]
    t0 = time.perf_counter()
    if answer_attention or (attention and not faithful):
        _full_read(pt, oracle, b, attention=attention and not faithful,
                   answer_attention=answer_attention)
    pt.label_s = time.perf_counter() - t0
    if faithful:
        pt.read_faithfully(oracle, reads, f"{task.get('id')}: stream read" if progress else None)
    elif attention:
        pt.read_cost["seconds"] = pt.label_s  # the one full read
    pt.attention_s = time.perf_counter() - t0
    return pt


def _check_fits(task: dict, n: int, n_answer: int, q_len: int, oracle: LMOracle,
                config: TaskWorldConfig, reads_whole: str | None) -> bool:
    """Whether the stream runs past the LM's window, or a ``TaskError`` saying why the task cannot
    be prepared: past the window only slot positions can read it, and nothing that reads the whole
    stream at once can run (``reads_whole``: 'labels', the cheap label's read; 'full-read'; None:
    nothing does); the question must fit the L0 tail."""
    beyond = n + n_answer > oracle.max_positions
    if beyond and config.position_mode != "slot":
        raise TaskError(
            f"task {task.get('id')!r}: {n} + {n_answer} tokens exceed the LM's "
            f"{oracle.max_positions} positions: position_mode {config.position_mode!r} reads "
            f"entries at their stream positions (use 'slot')"
        )
    if beyond and reads_whole is not None:
        # only what reads the whole stream at once stops at the LM's window: the full read (and
        # the cheap label, which is one); the working context's own forwards never get there
        raise TaskError(
            f"task {task.get('id')!r}: {n} + {n_answer} tokens exceed the LM's "
            f"{oracle.max_positions} positions: "
            + ("labelling reads the whole stream once (the cheap relevance, which the exact and "
               "hybrid labels use too): only streams within the window can be labelled"
               if reads_whole == "labels"
               else "the full read cannot run (use --world.read-mode faithful)")
        )
    if q_len > config.tail_tokens:
        raise TaskError(
            f"task {task.get('id')!r}: the question ({q_len} tokens) is longer than the "
            f"L0 tail ({config.tail_tokens}); raise --world.tail-tokens"
        )
    return beyond


def _block_texts(task: dict, offsets: np.ndarray, n: int, b: int, query: slice
                 ) -> tuple[list[str], str]:
    """(each complete L1 block's text, the query's text): the text BM25 and the dense baselines
    read. A block's text stops where the query starts: the query's own text never scores a
    block."""
    text = task["context"] + task["question"]
    q_char = int(offsets[query.start, 0])
    blocks = [text[offsets[j * b, 0] : min(offsets[(j + 1) * b - 1, 1], q_char)]
              if j * b < query.start else "" for j in range(n // b)]
    return blocks, text[q_char:]


def _full_read(pt: PreparedTask, oracle: LMOracle, b: int, attention: bool,
               answer_attention: bool) -> None:
    """The full read, one forward over the whole stream: with ``attention`` the question's
    attention (``attention_probs``, the last stream token's) and its cost; with
    ``answer_attention`` the answer teacher-forced after the stream, whose rows give the cheap
    label's relevance (``answer_relevance``)."""
    n, answer = len(pt.ids), pt.answer_ids
    read_ids = np.concatenate([pt.ids, answer[:-1]]) if answer_attention else pt.ids
    store = keystore.read(oracle, read_ids, b, n_queries=len(answer) if answer_attention else 1)
    if attention:
        pt.attention_probs = store.probs(0 if answer_attention else -1, n_keys=n).astype(
            np.float32)  # the last stream token's
        pt.read_cost = {"positions": len(read_ids), "forwards": 1}
    if answer_attention:
        pt.answer_relevance = answer_relevance(store, n, b)


def stream_cover(
    tree: MegaContextTree,
    n: int,
    question_tokens: int,
    config: TaskWorldConfig,
    stream_every: int = 0,
    task_id=None,
    record_reads: bool = False,
) -> tuple[WorkingContext, list[WorkingContext], list[keystore.StreamRead]]:
    """The question-time recency cover of the tree's first ``n`` tokens under ``config``'s budget:
    the cursor advances K tokens a step, each step's budget restored oldest first; then (with
    ``question_tail``) only the question stays protected. Also the covers every ``stream_every``
    steps (0: none), and (``record_reads``) the faithful stream reads: once ``read_tokens`` new
    tokens have arrived (and at the end), the restored cover with those tokens at L0 at its end
    (``sim.taskworld.keystore.stream_read``). ``TaskError`` when the budget cannot hold the
    stream."""
    wc = WorkingContext(tree, ContextConfig(w_max=config.w_max, tail_tokens=config.tail_tokens,
                                            position_mode=config.position_mode))
    restore = FocusAllocator(config.allocator)
    snapshots: list[WorkingContext] = []
    reads: list[keystore.StreamRead] = []
    read_from = 0
    try:
        while wc.n_tokens < n:
            wc.append_tokens(min(config.step_tokens, n - wc.n_tokens))
            restore.enforce_budget(wc)
            step = wc.n_tokens // config.step_tokens
            if stream_every and step % stream_every == 0 and wc.n_tokens < n - config.tail_tokens:
                snapshots.append(wc.copy())
            # read before the next step would take the unread tokens past read_tokens (<= R: the
            # newest R tokens are the protected tail, so every unread token stands at L0)
            fresh = wc.n_tokens - read_from
            if record_reads and (fresh + config.step_tokens > config.stream_read_tokens
                                 or wc.n_tokens == n):
                reads.append(keystore.StreamRead(wc.copy(), read_from, wc.n_tokens))
                read_from = wc.n_tokens
    except BudgetExhausted as err:  # name the task; any other exception is a bug and propagates
        raise TaskError(f"task {task_id!r} ({n} tokens): {err}") from err
    if config.question_tail and question_tokens:
        wc.shrink_tail(question_tokens)
    return wc, snapshots, reads


def with_budget(pt: PreparedTask, config: TaskWorldConfig, oracle: LMOracle) -> PreparedTask:
    """``pt`` at another budget (``config``'s W_max and tail; the same tree and per-block
    features): the question-time cover is streamed again, so a W_max sweep computes each task's
    block features once. In the faithful mode the stream's keys depend on the budget (each block
    was read with the working context before it), so the stream is read again too."""
    faithful = config.read_mode == "faithful" and pt.stream_keys is not None
    wc, _, reads = stream_cover(pt.wc.tree, pt.n_tokens, pt.question_tokens, config, 0,
                                pt.task.get("id"), record_reads=faithful)
    out = replace(pt, wc=wc, stream_snapshots=[], _attention={})
    if faithful:
        out.attention_s = out.read_faithfully(oracle, reads)
    return out


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
        view = FocusView(wc, config.n_tail_gists, oracle, pt.answer_ids, config.lookahead, pt,
                         config.attention_window)
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
