"""Question-time scoring of a task world (DESIGN.md §9): after a policy's zoom the answer is
scored as the continuation: mean NLL per answer token and exact match (teacher-forced argmax =
greedy decoding); focus recall = every needle token at L0 when the answer is scored.
"""

from __future__ import annotations

import time

import numpy as np

from megacontext.lm_oracle import LMOracle, answer_scores
from megacontext.working_context import WorkingContext
from sim.policy import FocusPolicy
from sim.taskworld.world import PreparedTask, TaskWorldConfig, zoom


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


def answer_task(
    policy: FocusPolicy, pt: PreparedTask, oracle: LMOracle, config: TaskWorldConfig
) -> dict:
    """One row of results: the policy's answer NLL, exact match, focus recall, rounds and actions;
    for a policy that reads the whole stream (``full``) on a stream past the LM's window, only
    ``skipped`` (why it cannot run)."""
    if policy.reads_everything:
        if pt.window is not None:  # nothing to score: the LM cannot read the whole stream
            return {"skipped": f"the stream and answer ({pt.n_tokens} + {len(pt.answer_ids)} "
                               f"tokens) exceed the LM's {pt.window} positions: "
                               f"{policy.name!r} reads everything and cannot run"}
        nll, em = answer_scores(oracle, None, pt.answer_ids, prefix_ids=pt.ids)
        return {
            "answer_nll": nll,
            "exact_match": float(em),
            "focus_recall": None if not pt.needle.any() else True,
            "rounds": 0,
            "expands": 0,
            "collapses": 0,
            "slots": pt.n_tokens,
            "policy_s": 0.0,
        }
    read_before = pt.attention_s
    wc, info = zoom(policy, pt, config, oracle)
    # faithful: the rounds' forwards over their refocused contexts (each policy pays its own)
    info["reread_s"] = pt.attention_s - read_before
    t0 = time.perf_counter()
    nll, em = answer_scores(oracle, wc.arrays(config.n_tail_gists), pt.answer_ids)
    return {
        "answer_nll": nll,
        "exact_match": float(em),
        "focus_recall": focus_recall(pt, wc),
        **info,
        "lm_forward_s": time.perf_counter() - t0,
        "focus_map": wc.focus_map(200),
    }
