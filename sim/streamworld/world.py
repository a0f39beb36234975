"""One focus episode: a document streamed through tree, working context and allocator, K tokens a
step.

``WorldConfig`` gathers every size of the loop (tree, context budget, allocator, K, H, tail gists,
the synthetic world). ``Episode`` owns one document's tree/context/allocator and exposes the step
cycle that trace generation, evaluation and the gymnasium environment all share:
``advance()`` ingests K tokens (the context may now be over budget), ``query()`` is the next H
tokens, ``refocus(scores)`` is the step's one allocator pass (restore the budget with the scores,
then expand/swap; DESIGN §4), ``nll()`` asks the oracle about the current context.
``evaluate_policy`` runs a policy over held-out documents (NLL after each refocus, budget use, swap
rate, time per step) and ``nll_gap_recovered`` compares policies on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from megacontext.allocator import Action, AllocatorConfig, FocusAllocator
from megacontext.oracle import NLLOracle
from megacontext.tree import ConfigError, Gister, MegaContextTree, TreeConfig, mean_gister
from megacontext.working_context import ContextArrays, ContextConfig, WorkingContext, min_slots
from sim.policy import FocusPolicy, FocusView
from sim.streamworld.synthetic import (
    SyntheticConfig,
    SyntheticDocument,
    SyntheticOracle,
    generate_document,
)

HELD_OUT_FIRST_DOC = 1_000_000
"""Document ids from here on are held out: the study evaluates on them; LM documents draw their
text from held-out pydoc topics."""


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the focus loop and of the synthetic world."""

    env: Literal["synthetic", "lm"] = "synthetic"
    """Oracle: the exact synthetic world, or the real LM."""
    gister: Literal["auto", "gistnet", "mean"] = "auto"
    """LM world's gists: 'auto' = the committed GistNet checkpoint when it fits the LM and b
    (SmolLM2, b=32), else mean pooling; 'gistnet' insists; 'mean' = the baseline. The synthetic
    world always uses means."""
    step_tokens: int = 32
    """K: tokens ingested per refocus step."""
    horizon: int = 64
    """H: query tokens whose NLL defines utility and reward."""
    n_tail_gists: int = 6
    """Tail gists given to LensNet."""
    warmup_tokens: int = 256
    """No refocus (or label) until this many tokens are in."""
    tree: TreeConfig = field(
        default_factory=lambda: TreeConfig(block_size=32, max_level=2, d_model=128)
    )
    context: ContextConfig = field(
        default_factory=lambda: ContextConfig(w_max=256, tail_tokens=128),
        metadata={"flatten": True},  # --world.w-max as in sim.evaluate (old: --world.context.w-max)
    )
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.step_tokens < 1 or self.horizon < 1:
            raise ConfigError("step_tokens and horizon must be >= 1")
        if self.warmup_tokens < self.step_tokens:
            raise ConfigError("warmup_tokens must be >= step_tokens")
        if self.env == "synthetic":
            s = self.synthetic
            if (s.block_size, s.d_model) != (self.tree.block_size, self.tree.d_model):
                raise ConfigError(
                    f"synthetic block_size/d_model ({s.block_size}, {s.d_model}) must equal the "
                    "tree's "
                    f"({self.tree.block_size}, {self.tree.d_model})"
                )
            if len(s.info) < self.tree.max_level + 1:
                raise ConfigError(
                    f"synthetic.info needs {self.tree.max_level + 1} levels, has {len(s.info)}"
                )
        doc_tokens = self.synthetic.n_blocks * self.tree.block_size  # document length, either world
        need = max(
            min_slots(t, self.tree.block_size, self.tree.max_level, self.context.tail_tokens)
            for t in range(self.step_tokens, doc_tokens + 1, self.step_tokens)
        )
        if need > self.context.w_max:
            raise ConfigError(
                f"w_max={self.context.w_max} cannot hold a {doc_tokens}-token document even fully "
                f"collapsed (needs {need}); raise w_max or shorten the document"
            )


class Episode:
    """One document through the focus loop."""

    def __init__(
        self,
        config: WorldConfig,
        token_ids: np.ndarray,
        embeddings: np.ndarray,
        oracle: NLLOracle,
        gister: Gister = mean_gister,
        doc_id: int = 0,
    ) -> None:
        self.config = config
        self.token_ids, self.embeddings = token_ids, embeddings
        self.oracle = oracle
        self.doc_id = doc_id
        self.tree = MegaContextTree(config.tree, gister=gister, reserve_tokens=len(token_ids))
        self.wc = WorkingContext(self.tree, config.context)
        self.allocator = FocusAllocator(config.allocator)

    @property
    def n_doc_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def can_query(self) -> bool:
        """Whether H tokens remain after the cursor."""
        return self.wc.n_tokens + self.config.horizon <= self.n_doc_tokens

    def advance(self) -> int:
        """Ingest the next K tokens (all of the warm-up on the first call); returns how many.

        The budget is not restored here: the step's ``refocus`` does it with the policy's scores
        (or ``restore`` does it alone)."""
        t = self.wc.n_tokens
        k = (
            max(self.config.warmup_tokens - t, self.config.step_tokens)
            if t < self.config.warmup_tokens
            else self.config.step_tokens
        )
        k = min(k, self.n_doc_tokens - t)
        if k <= 0:
            raise ValueError("the document is exhausted")
        self.tree.ingest(self.token_ids[t : t + k], self.embeddings[t : t + k])
        self.wc.append_tokens(k)
        return k

    def restore(self, scores: np.ndarray | None = None) -> list[Action]:
        """Only restore the budget (collapses, cheapest by ``scores`` or oldest first); no step."""
        return self.allocator.enforce_budget(self.wc, scores)

    def query(self) -> tuple[np.ndarray, int]:
        """(next H token ids, index of the first)."""
        t = self.wc.n_tokens
        return self.token_ids[t : t + self.config.horizon], t

    def arrays(self) -> ContextArrays:
        return self.wc.arrays(self.config.n_tail_gists)

    def refocus(self, scores: np.ndarray) -> list[Action]:
        """The step's allocator pass: restore the budget with ``scores``, then expand/swap."""
        return self.allocator.step(self.wc, scores)

    def view(self) -> FocusView:
        """What a policy may read at this step (``sim.policy.FocusView``)."""
        ids, _ = self.query()
        return FocusView(self.wc, self.config.n_tail_gists, self.oracle, ids)

    def nll(self) -> float:
        ids, start = self.query()
        return float(self.oracle.nll([self.arrays()], ids, start)[0])


def synthetic_episode(
    config: WorldConfig, doc_id: int, seed: int
) -> tuple[Episode, SyntheticDocument]:
    """An episode over synthetic document ``doc_id`` of run ``seed`` (documents are reproducible).
    """
    doc = generate_document(config.synthetic, np.random.default_rng([seed, doc_id]))
    return Episode(config, doc.token_ids, doc.embeddings, SyntheticOracle(doc), doc_id=doc_id), doc


def lm_episode(
    config: WorldConfig,
    doc_id: int,
    seed: int,
    oracle,
    tokenizer=None,
    gister: Gister = mean_gister,
) -> Episode:
    """An episode over a real-text document for the LM oracle: a window of the pydoc topics at an
    offset drawn from (seed, doc_id) (random ids when the LM has no tokenizer, e.g. the tiny test
    LM).
    Documents with ``doc_id >= HELD_OUT_FIRST_DOC`` come from the held-out topics, others from the
    training topics, so held-out evaluation never sees training text."""
    from megacontext.lm import pydoc_token_ids

    n = config.synthetic.n_blocks * config.tree.block_size
    rng = np.random.default_rng([seed, doc_id])
    if tokenizer is not None:
        text = pydoc_token_ids(tokenizer, "heldout" if doc_id >= HELD_OUT_FIRST_DOC else "train")
        if len(text) <= n:
            raise ConfigError(
                f"documents of {n} tokens do not fit the pydoc split ({len(text)} tokens)"
            )
        start = int(rng.integers(0, len(text) - n))
        ids = text[start : start + n]
    else:
        ids = rng.integers(0, oracle.embed.num_embeddings, n)
    return Episode(config, ids, oracle.token_embeddings(ids), oracle, gister=gister, doc_id=doc_id)


def evaluate_policy(
    policy: FocusPolicy,
    world: WorldConfig,
    doc_ids: Sequence[int],
    seed: int,
    progress: bool = True,
    episode_factory: Callable[[WorldConfig, int, int], Episode] | None = None,
    on_step: Callable[[str, Episode, list[Action]], None] | None = None,
) -> dict:
    """Run ``policy`` over documents; NLL is measured after each refocus, on the next H tokens."""
    make = episode_factory or (lambda w, d, s: synthetic_episode(w, d, s)[0])
    per_doc, slots, times = [], [], []
    n_steps = n_collapse = n_expand = n_forced = 0
    for doc in tqdm(doc_ids, desc=f"eval {policy.name}", disable=not progress, leave=False):
        ep = make(world, doc, seed)
        nlls = []
        while ep.wc.n_tokens < ep.n_doc_tokens:
            ep.advance()
            if not ep.can_query():
                break
            t0 = time.perf_counter()
            actions = policy.apply(ep)
            times.append(time.perf_counter() - t0)
            ep.wc.check_invariants()  # budget (and every other invariant) after every step
            n_expand += sum(a.kind == "expand" for a in actions)
            n_collapse += sum(a.kind == "collapse" and not a.forced for a in actions)
            n_forced += sum(a.forced for a in actions)
            nlls.append(ep.nll())
            slots.append(len(ep.wc))
            n_steps += 1
            if on_step is not None:
                on_step(policy.name, ep, actions)
        per_doc.append(float(np.mean(nlls)))
    per_doc_arr = np.asarray(per_doc)
    return {
        "nll": float(per_doc_arr.mean()),
        "nll_std_over_docs": float(per_doc_arr.std(ddof=1)) if len(per_doc) > 1 else 0.0,
        "nll_per_doc": per_doc,
        "budget_use": float(np.mean(slots) / world.context.w_max),
        "max_slots": int(np.max(slots)),
        "w_max": world.context.w_max,
        "expands_per_step": n_expand / max(n_steps, 1),
        "swap_rate": n_collapse / max(n_steps, 1),
        "restores_per_step": n_forced / max(n_steps, 1),
        "ms_per_step": 1e3 * float(np.mean(times)),
        "steps": n_steps,
    }


def nll_gap_recovered(results: dict[str, dict]) -> dict[str, float | None]:
    """NGR = (NLL_recency - NLL_policy) / (NLL_recency - NLL_oracle) for every policy."""
    rec, orc = results["recency"]["nll"], results["oracle"]["nll"]
    gap = rec - orc
    return {
        name: ((rec - r["nll"]) / gap if abs(gap) > 1e-12 else None) for name, r in results.items()
    }
