"""Streaming cost against stream length (issue "Unbounded history", item 3): seconds per 1 000
tokens streamed (wall clock, and the process's CPU time, which another job on the machine does
not inflate: the LM runs on one thread) and the memory of the tree and the key store, for streams
far past the LM's window, in the faithful mode (the only one that exists there).

    python -m benchmarks.long_stream [--lengths 8192 32768 131072] [--w-max 384] [--lm smollm2]
        [--seed 0]

Per length, one held-out ``niah-single`` task (``--cycle-filler``: the held-out text repeats past
its ~22k tokens) is streamed to question time by ``sim.taskworld.world.prepare_task`` in a fresh
process (so its peak RSS is that length's alone): the tree ingests it (GistNet gists), the cursor
runs K tokens a step with the allocator's restores, and the faithful read gives every token its keys
from the working context that read it. Reported per length: seconds and seconds per 1k tokens, the
tree's bytes (``MegaContextTree.nbytes``), the key store's bytes, the process's peak RSS, LM
positions run. The ratios longest / shortest come from the same run: per-token time should stay
flat (ratio ~1), the tree and store grow linearly (ratio ~ the length ratio). Writes
``benchmarks/results/long_stream.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(length: int, lm: str, seed: int, w_max: int = 384) -> dict:
    """Stream one task of ``length`` tokens; its measurements (run in its own process)."""
    import torch

    from gistnet.gister import resolve_gister
    from megacontext.lm import load_lm
    from megacontext.lm_oracle import LMOracle
    from sim.tasks import TaskConfig, generate_tasks
    from sim.taskworld.world import CharTokenizer, TaskWorldConfig, prepare_task

    model, tokenizer = load_lm(lm)
    oracle = LMOracle(model)
    world = TaskWorldConfig(w_max=w_max)  # 128k tokens: 125 L2 gists, past W_max 192 at L2
    if lm == "tiny":  # tests: the tiny LM's sizes (block 4, a level more for the long stream)
        world = TaskWorldConfig(block_size=4, max_level=3, w_max=256, tail_tokens=128,
                                step_tokens=4, n_tail_gists=3)
    tok = tokenizer or CharTokenizer(model.config.vocab_size)
    config = TaskConfig(kind="niah-single", split="heldout", n_tasks=1, length=(length,),
                        seed=seed, cycle_filler=True, depths=(0.5,),
                        tokenizer="chars" if lm == "tiny" else "smollm2")
    (task,) = generate_tasks(config, tokenizer)
    gister, _ = resolve_gister("auto", model, world.block_size)
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        pt = prepare_task(task, oracle, tok, world, gister, features=False, attention=True)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    store = sum(k.numel() * k.element_size() for k in pt.stream_keys)
    return {
        "length": length,
        "n_tokens": pt.n_tokens,
        "past_window": pt.window is not None,
        "seconds": seconds,
        "s_per_1k_tokens": 1000 * seconds / pt.n_tokens,
        "cpu_seconds": cpu_seconds,
        "cpu_s_per_1k_tokens": 1000 * cpu_seconds / pt.n_tokens,
        "read_seconds": pt.read_cost.get("seconds"),
        "lm_positions": pt.read_cost.get("positions"),
        "tree_bytes": pt.wc.tree.nbytes(),
        "store_bytes": store,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "w_max": world.w_max,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--lm", default="smollm2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-max", type=int, default=384, help="working-context slots (real LM)")
    ap.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.lm, args.seed, args.w_max)))
        return
    from benchmarks.common import write_results

    rows = []
    for length in args.lengths:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.long_stream", "--one", str(length), "--lm",
             args.lm, "--seed", str(args.seed), "--w-max", str(args.w_max)],
            check=True, capture_output=True, text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{length:>7} tokens: {r['seconds']:.1f} s ({r['s_per_1k_tokens']:.2f} s per 1k; CPU "
              f"{r['cpu_s_per_1k_tokens']:.2f}), "
              f"tree {r['tree_bytes'] / 2**20:.1f} MiB, store {r['store_bytes'] / 2**20:.1f} MiB, "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    first, last = rows[0], rows[-1]
    ratios = {
        "length": last["n_tokens"] / first["n_tokens"],
        "s_per_1k_tokens": last["s_per_1k_tokens"] / first["s_per_1k_tokens"],
        "cpu_s_per_1k_tokens": last["cpu_s_per_1k_tokens"] / first["cpu_s_per_1k_tokens"],
        "tree_plus_store_bytes": (last["tree_bytes"] + last["store_bytes"])
        / (first["tree_bytes"] + first["store_bytes"]),
        "peak_rss_bytes": last["peak_rss_bytes"] / first["peak_rss_bytes"],
    }
    config = {"lengths": args.lengths, "lm": args.lm, "seed": args.seed, "w_max": args.w_max}
    write_results("long_stream", config,
                  {"per_length": rows, "ratios_longest_over_shortest": ratios}, args.out_dir)


if __name__ == "__main__":
    main()
