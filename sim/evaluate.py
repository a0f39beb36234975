"""``python -m sim.evaluate``: the shipped LensNet + GistNet and the baselines on any task file
(DESIGN §9).

    python -m sim.evaluate --tasks FILE.jsonl --out DIR [--world.w-max N] [--policies a,b,...]
                           [--lm PATH] [--lensnet CKPT]

Every task streams ``context + question`` through the tree to question time
(``sim.taskworld.world``); each policy then zooms for up to ``--world.zoom-rounds`` rounds through
the same allocator at the same W_max, and the answer is scored. Decisions read the LM in
``--world.read-mode`` (DESIGN §11): ``faithful`` (the default: keys from the stream as its working
context read it, the question's query from each round's working context) or ``full-read``
(privileged: one forward over the whole stream; report it only beside a faithful run). ``--resume``
continues an interrupted run. Writes ``DIR/tasks.jsonl`` (one row per task and policy, flushed as it
goes, so an interrupted run keeps what it measured) and ``DIR/results.json``::

    {"config": {"read_mode": "faithful" | "full-read", "w_max": ..., ...},
     "policies": {"<name>": {"exact_match": float, "answer_nll": float,
                             "focus_recall": float | null, "n": int,
                             "ngr": float, "ngr_ci95": [lo, hi], ...}},  # ngr: when recency and
                             oracle ran
     "grid": {"<name>": {"<length>": {"<depth>": exact_match}}},
     "read_cost": {"positions_per_token": ..., ...},  # the attention read (None: none ran)
     "n_tasks": int,  # tasks evaluated (a skipped line is in "errors", not here)
     "errors": [...], ...}

``focus_recall`` = fraction of tasks whose needle tokens were all at L0 when the answer was scored
(null when no task names needle spans). A malformed task line (bad JSON, missing field, span
outside the context, text longer than the LM's positions) is reported with its line number and
skipped; the other tasks still run. Exit status 1 when any line was skipped. Paths inside the
project (the shipped LensNet) are recorded relative to the project's root, so results files name no
machine's folders.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from megacontext.cli import run_cli, to_argv, to_dict
from megacontext.tree import ConfigError
from sim.policies import LensNetPolicy, LensNetRank, build_policy, check_query_fits, policy_names
from sim.policy import PolicyContext
from sim.taskworld.scoring import answer_task, needle_level
from sim.taskworld.world import TaskError, TaskWorldConfig, prepare_task

POLICIES = policy_names("tasks")
DEFAULT_POLICIES = (
    "lensnet,lensnet_rank,recency,sinks,random,retrieval,bm25,attention,surprisal,full"
)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
EDGE_DEPTH = 0.1
"""Needle depths below this or above 1 - this are the edges, reported apart from the interior
(``by_depth`` in results.json): at depth 0 the needle shares block 0 with the sink token, at depth
1 it stands next to the question."""


def portable_path(path: str | Path | None) -> str | None:
    """``path`` relative to the project's root when it lies inside it (the shipped checkpoints),
    else as given: a results file should not name the folders of the machine that wrote it."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    return (
        str(resolved.relative_to(PROJECT_ROOT))
        if resolved.is_relative_to(PROJECT_ROOT)
        else str(path)
    )


@dataclass
class EvaluateArgs:
    """Evaluate focus policies on a JSONL task file with the frozen LM."""

    tasks: str = ""
    """JSONL task file (``python -m sim.tasks`` writes them): id, context, question, answer,
    needle_spans."""
    out: str = "runs/evaluate"
    """Output directory: results.json, tasks.jsonl, command.txt."""
    policies: str = DEFAULT_POLICIES
    """Comma-separated policies among lensnet (as its calibration gates it), lensnet_rank (LensNet's
    order on the heuristics' rank scale), recency, sinks, random, retrieval (dense: LM hidden
    states), bm25 (lexical), attention (the last token's attention per block), surprisal, oracle,
    full ('oracle' labels every action of every round: about a minute per 2k-token task on a 2-core
    CPU)."""
    lm: str = "smollm2"
    """'smollm2', 'tiny' (random-init test LM, character tokenizer) or a local model folder."""
    lensnet: str = "auto"
    """LensNet checkpoint; 'auto' = the shipped one (lensnet/checkpoints) when it was trained for
    this LM and for the task kind of every task in the file, else an error when --policies names
    lensnet or lensnet_rank."""
    lensnets: tuple[str, ...] = ()
    """Further LensNet checkpoints, each NAME=CKPT: policy NAME (as its calibration gates it) and
    NAME_rank (its order), run beside --policies on the same prepared tasks (other training seeds,
    ablations); NAME must not clash with a policy name."""
    gister: str = "auto"
    """'auto' (the shipped GistNet when it fits the LM), 'gistnet' or 'mean'."""
    seed: int = 0
    """Seed of the random baseline."""
    w_max_sweep: tuple[int, ...] = ()
    """Also evaluate every task at each of these W_max (each task's features computed once, only
    its cover streamed again): OUT/w-W/results.json per W_max, and exact match and answer NLL
    against the compression ratio in OUT/sweep/ (compression_sweep.png and .json)."""
    progress: bool = True
    """Progress bars."""
    resume: bool = False
    """Continue an interrupted run in --out: tasks whose rows (every policy) are in its
    tasks.jsonl are kept and not run again; the run's command (command.txt) must be the same
    (--max-tasks aside: a run grows by resuming with a larger one). results.json then summarises
    every row. Not with --w-max-sweep."""
    max_tasks: int = 0
    """Evaluate only the file's first N valid tasks (0 = all): long streams take minutes each, so a
    run can start small and grow with --resume and a larger N (results.json records N)."""
    open_sealed: bool = False
    """Read a sealed test-split file (python -m sim.tasks.sealed; refused without this flag).
    Evaluating the sealed split is done once, by the committed script (scripts/sealed_test.sh), at
    the end of a study; the flag is recorded in results.json's config."""
    world: TaskWorldConfig = field(default_factory=TaskWorldConfig)


def _policy_objects(
    names: list[str], args: EvaluateArgs, model, device, kind: str | None
) -> tuple[list, str | None]:
    """The policies named (``sim.policies``); ``kind``: the task kind every task of the file names
    (else None), which the shipped LensNet must have been trained on to be the default."""
    lens_path, lens = None, None
    if {"lensnet", "lensnet_rank"} & set(names):
        from lensnet.train import load_model
        from sim.shipped import default_lensnet_path, shipped_lensnet_task

        lens_path = default_lensnet_path(model, kind) if args.lensnet == "auto" else args.lensnet
        if lens_path is None:
            asked = [n for n in names if n in ("lensnet", "lensnet_rank")]
            raise ConfigError(
                f"--policies names {', '.join(asked)} but no shipped LensNet fits this LM and "
                f"these tasks (shipped: trained on {shipped_lensnet_task()} tasks; these: "
                f"{kind or 'mixed or unnamed kinds'}): pass --lensnet CKPT, or leave "
                f"lensnet/lensnet_rank out of --policies"
            )
        lens = load_model(lens_path, device)
    ctx = PolicyContext(seed=args.seed, lensnet=lens, device=str(device))
    policies = [build_policy(name, ctx, "tasks") for name in names]
    return policies + _extra_lensnets(args.lensnets, names, device), portable_path(lens_path)


def same_policies(policies: list) -> dict[str, str]:
    """{rank twin: calibrated name} for each LensNet whose calibration chose the rank gate: it then
    scores exactly as its ``_rank`` twin (``lensnet`` / ``lensnet_rank``, NAME / NAME_rank), so
    the twin is not run a second time and its row would only repeat the other's."""
    by_name = {p.name: p for p in policies}
    same = {}
    for p in policies:
        twin = by_name.get(f"{p.name}_rank")
        if (isinstance(p, LensNetPolicy) and isinstance(twin, LensNetRank)
                and twin.model is p.model and p.gated_by_rank):
            same[twin.name] = p.name
    return same


def trained_read_mode(path: str | None) -> str | None:
    """The read mode a LensNet checkpoint's features were computed in, from its card (the .json
    beside it; ``world.read_mode``): cards from before the faithful mode name none, and their
    features came from a full read. None without a checkpoint or a card."""
    if path is None:
        return None
    cards = [Path(path).with_suffix(".json"), (PROJECT_ROOT / path).with_suffix(".json")]
    card = next((c for c in cards if c.is_file()), None)  # as given, or inside the project
    if card is None:
        return None
    return json.loads(card.read_text()).get("world", {}).get("read_mode", "full-read")


def _extra_lensnets(specs: tuple[str, ...], names: list[str], device) -> list:
    """The policies of ``--lensnets`` NAME=CKPT: NAME (calibrated) and NAME_rank (its order)."""
    from lensnet.train import load_model

    out, taken = [], set(names) | set(POLICIES)
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lensnets: expected NAME=CKPT, got {spec!r}")
        if {name, f"{name}_rank"} & taken:
            raise ConfigError(f"--lensnets: name {name!r} clashes with a policy name")
        if not Path(path).exists():
            raise ConfigError(f"--lensnets: {name}: no checkpoint at {path}")
        taken |= {name, f"{name}_rank"}
        model = load_model(path, device)
        out += [LensNetPolicy(model, device, name=name),
                LensNetRank(model, device, name=f"{name}_rank")]
    return out


def summarise(rows: list[dict], names: list[str]) -> tuple[dict, dict]:
    """Per policy means (exact match, answer NLL, focus recall, rounds, actions) and the length x
    depth grid."""
    policies, grid = {}, {}
    for name in names:
        rs = [r for r in rows if r["policy"] == name and not r.get("skipped")]
        skipped = [r["skipped"] for r in rows if r["policy"] == name and r.get("skipped")]
        if skipped and not rs:  # e.g. full context on streams past the LM's window: say why
            policies[name] = {"n": 0, "skipped": len(skipped), "skipped_why": skipped[0]}
            continue
        if not rs:
            continue
        recall = [r["focus_recall"] for r in rs if r["focus_recall"] is not None]
        em = np.array([r["exact_match"] for r in rs])
        policies[name] = {
            "exact_match": float(em.mean()),
            "answer_nll": float(np.mean([r["answer_nll"] for r in rs])),
            "focus_recall": float(np.mean(recall)) if recall else None,
            "n": len(rs),
            "exact_match_ci95": _bootstrap(em, seed=0),
            "rounds": float(np.mean([r["rounds"] for r in rs])),
            "expands": float(np.mean([r["expands"] for r in rs])),
            "collapses": float(np.mean([r["collapses"] for r in rs])),
            "policy_ms": 1e3 * float(np.mean([r["policy_s"] for r in rs])),
            "reread_ms": 1e3 * float(np.mean([r.get("reread_s", 0.0) for r in rs])),
            "compression": float(np.mean([r["n_tokens"] / r["w_max"] for r in rs])),
        }
        if skipped:  # some tasks past the LM's window: the means are over the others
            policies[name].update(skipped=len(skipped), skipped_why=skipped[0])
        depths = [(r["depth"], r["exact_match"]) for r in rs if r.get("depth") is not None]
        if depths:  # the edges of the depth range (the sink's block, the question's) apart
            d, em_d = np.array(depths).T
            edge = (d < EDGE_DEPTH) | (d > 1 - EDGE_DEPTH)
            policies[name]["by_depth"] = {
                part: {"n": int(sel.sum()),
                       "exact_match": float(em_d[sel].mean()) if sel.any() else None}
                for part, sel in (("edge", edge), ("interior", ~edge))
            }
        levels = [r["needle_level"] for r in rs if r.get("needle_level") is not None]
        if (
            levels
        ):  # where the needle sat at question time, before any zoom (the same for every policy)
            policies[name]["needle_under_l2"] = float(np.mean(np.asarray(levels) >= 2))
        cells: dict[str, dict[str, list[float]]] = {}
        for r in rs:
            cells.setdefault(str(r["length"]), {}).setdefault(str(r["depth"]), []).append(
                r["exact_match"]
            )
        grid[name] = {
            n: {d: float(np.mean(v)) for d, v in sorted(ds.items())}
            for n, ds in sorted(cells.items())
        }
    for ref in ("oracle", "full"):  # the gap to the oracle's labels, and to the whole stream read
        for name, value in gap_recovered(rows, names, ref=ref).items():
            policies[name].update(value)
    return policies, grid


def _ngr(w: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """NGR from group weights ``w`` (..., n_groups), per-group NLL sums (n_groups, 3: recency,
    policy,
    oracle) and task counts (n_groups,); NaN where the oracle gap is 0."""
    m = (w @ sums) / (w @ counts)[..., None]
    gap = m[..., 0] - m[..., 2]
    return np.where(
        np.abs(gap) > 1e-12, (m[..., 0] - m[..., 1]) / np.where(gap == 0, 1, gap), np.nan
    )


def gap_recovered(
    rows: list[dict], names: list[str], n_boot: int = 2000, seed: int = 0, ref: str = "oracle"
) -> dict[str, dict]:
    """NGR = (NLL_recency - NLL_policy) / (NLL_recency - NLL_ref) of the mean answer NLL over the
    tasks that recency, the reference and the policy all scored, with a 95 % percentile-bootstrap
    interval that resamples documents (a row's ``group``: the module of a code task, else the task),
    so windows of one document move together. ``ref``: the oracle (keys ``ngr``, ``ngr_n``,
    ``ngr_ci95``) or 'full' (the whole stream read: keys ``ngr_full``...). Empty without both
    recency and reference rows (skipped rows do not count)."""
    by = {(r["policy"], r["id"]): r for r in rows if not r.get("skipped")}
    if not any(p == ref for p, _ in by) or not any(p == "recency" for p, _ in by):
        return {}
    key = "ngr" if ref == "oracle" else f"ngr_{ref}"
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        ids = [i for p, i in by if p == name and ("recency", i) in by and (ref, i) in by]
        if not ids:
            continue
        nll = np.array(
            [[by[(p, i)]["answer_nll"] for p in ("recency", name, ref)] for i in ids]
        )
        groups = np.unique([str(by[(name, i)].get("group", i)) for i in ids], return_inverse=True)[
            1
        ]
        sums = np.zeros((groups.max() + 1, 3))
        np.add.at(sums, groups, nll)
        counts = np.bincount(groups).astype(np.float64)

        point = float(_ngr(np.ones(len(counts)), sums, counts))
        draws = _ngr(
            np.stack(
                [
                    np.bincount(rng.integers(0, len(counts), len(counts)), minlength=len(counts))
                    for _ in range(n_boot)
                ]
            ).astype(np.float64),
            sums,
            counts,
        )
        draws = draws[np.isfinite(draws)]
        out[name] = {
            key: None if not np.isfinite(point) else point,
            f"{key}_n": len(ids),
            f"{key}_ci95": (
                [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]
                if len(counts) > 1 and draws.size
                else None
            ),
        }
    return out


def _bootstrap(x: np.ndarray, seed: int, n: int = 2000) -> list[float] | None:
    """95% percentile-bootstrap interval of the mean over tasks."""
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n, x.size))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def evaluate_tasks(args: EvaluateArgs) -> dict:
    """Run every policy on every task of ``args.tasks``; writes and returns the results. Gradients
    are off inside and the caller's grad mode is restored after."""
    import torch

    with torch.no_grad():
        return _evaluate(args)


def _evaluate(args: EvaluateArgs) -> dict:
    """The pipeline of the module docstring: prepare (the task file, the run folder), load the LM
    and the policies, stream and score every task, report."""
    from megacontext.cli import versions
    from sim.taskworld.world import load_reader

    names = _policy_list(args)
    tasks, lines, error_rows = _read_task_file(args)
    out = _open_run(args)
    if not args.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    lm = load_reader(args.lm, args.gister, args.world.block_size)
    kinds = {(t.get("meta") or {}).get("kind") for t in tasks}
    kind = next(iter(kinds)) if len(kinds) == 1 else None
    policies, lens_path = _policy_objects(names, args, lm.model, lm.oracle.device, kind)
    same = same_policies(policies)
    for twin, name in same.items():
        print(f"note: {twin} is {name} (its calibration chose the rank gate): run once, as {name}",
              file=sys.stderr)
    policies = [p for p in policies if p.name not in same]
    run = _Run(errors=error_rows)
    if args.resume:
        _resume(run, out, tasks, policies, args.max_tasks)
    t_start = time.perf_counter()
    _stream_and_score(args, tasks, lines, policies, lm, out, run)
    results = _report(args, run, policies, lm.gister_name, lens_path)
    if same:  # the twins left out: results name them
        results["config"]["same_as"] = same
    results["timings"] = {"total_s": time.perf_counter() - t_start,
                          **{f"{k}_s": v for k, v in run.spent.items()}}
    results["versions"] = versions()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(format_results(results))
    if args.w_max_sweep:
        _write_sweep(out, results, run, policies)
    return results


@dataclass
class _Run:
    """What an evaluation has measured so far."""

    errors: list[dict]
    """Skipped task lines: {"line", "error"}."""
    rows: list[dict] = field(default_factory=list)
    """One per task and policy (resumed ones first)."""
    done: set = field(default_factory=set)
    """Ids of the tasks resumed from disk."""
    sweep_rows: dict[int, list[dict]] = field(default_factory=dict)
    sweep_errors: dict[int, list[dict]] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)
    """Seconds: streaming + features of every task ('prepare'), and each policy (zoom + answer)."""
    n_evaluated: int = 0
    """Tasks that streamed to question time (a skipped line is in ``errors``)."""


def _policy_list(args: EvaluateArgs) -> list[str]:
    """--policies as names, refused when empty or unknown, and the task file named."""
    if not args.tasks:
        raise ConfigError("--tasks FILE.jsonl is required")
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise ConfigError(f"--policies: unknown {bad} (choose from {', '.join(POLICIES)})")
    return names


def _read_task_file(args: EvaluateArgs) -> tuple[list[dict], dict[str, int], list[dict]]:
    """(the tasks, each id's line, the malformed lines as error rows): a sealed file is refused
    unless opened on purpose; --max-tasks keeps the file's first N."""
    from sim.tasks import scan_tasks
    from sim.tasks.jsonl import is_sealed

    if not args.open_sealed and is_sealed(args.tasks):
        raise ConfigError(
            f"{args.tasks} is a sealed test-split file (meta.sealed): it is evaluated once, by the "
            f"committed script (scripts/sealed_test.sh, with --open-sealed); use a dev file"
        )
    lines: dict[str, int] = {}
    tasks, errors = scan_tasks(args.tasks, lines=lines)
    if args.max_tasks < 0:
        raise ConfigError(f"--max-tasks must be >= 0 (0 = all), got {args.max_tasks}")
    if args.max_tasks:
        tasks = tasks[: args.max_tasks]
    for e in errors:
        print(f"error: {e} (skipped)", file=sys.stderr)
    return tasks, lines, [{"line": e.line, "error": str(e)} for e in errors]


def _open_run(args: EvaluateArgs) -> Path:
    """The run folder with its command.txt and the task file's sha256 (``tasks.sha256``); a
    resumed one must hold this same command, over the same task file."""
    from sim.tasks.jsonl import file_sha256

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = _command(args)
    digest = file_sha256(args.tasks)
    if args.resume and args.w_max_sweep:
        raise ConfigError("--resume does not combine with --w-max-sweep")
    if args.resume:
        _check_resumable(out, _command(replace(args, max_tasks=0)), digest)
    (out / "command.txt").write_text(command)
    (out / "tasks.sha256").write_text(f"{digest}  {args.tasks}\n")
    return out


def _resume(run: _Run, out: Path, tasks: list[dict], policies: list, max_tasks: int) -> None:
    """The rows an interrupted run left in ``out``; refused when they reach past --max-tasks."""
    done_rows = _resumed_rows(out, [p.name for p in policies])
    extra = {r["id"] for r in done_rows} - {t["id"] for t in tasks}
    if extra:  # a run does not shrink: its summary would mix tasks beyond --max-tasks
        raise ConfigError(
            f"--resume: {out} holds {len(extra)} task(s) beyond the file's first "
            f"{max_tasks} (--max-tasks): resume with a --max-tasks at least as large"
        )
    run.rows = list(done_rows)
    run.done = {r["id"] for r in done_rows}
    run.n_evaluated = len(run.done)


def _stream_and_score(args: EvaluateArgs, tasks: list[dict], lines: dict[str, int],
                      policies: list, lm, out: Path, run: _Run) -> None:
    """Every task not yet done: stream it to question time, then every policy zooms and answers
    (``_score_task``); rows go to ``OUT/tasks.jsonl`` as they come. A task that cannot stream is
    an error row, and the others still run."""
    needs = {"features": any(p.needs_features for p in policies),
             "surprisal": any(p.needs_surprisal for p in policies),
             "attention": any(p.needs_attention for p in policies)}
    with (out / "tasks.jsonl").open("a" if args.resume else "w") as log:
        for task in tqdm(tasks, desc="tasks", disable=not args.progress):
            line = lines.get(str(task["id"]))
            if task["id"] in run.done:
                continue
            try:
                t0 = time.perf_counter()
                pt = prepare_task(task, lm.oracle, lm.tokenizer, args.world, lm.gister,
                                  progress=args.progress, **needs)
                run.spent["prepare"] = run.spent.get("prepare", 0.0) + time.perf_counter() - t0
                check_query_fits(pt, policies)
            except TaskError as err:
                msg = f"{args.tasks}: line {line}: {err}"
                print(f"error: {msg} (skipped)", file=sys.stderr)
                run.errors.append({"line": line, "error": msg})
                continue
            run.n_evaluated += 1
            _score_task(args, task, line, pt, policies, lm.oracle, run, log)


def _score_task(args: EvaluateArgs, task: dict, line, pt, policies: list, oracle, run: _Run,
                log) -> None:
    """Each policy's zoom and answer on one streamed task (a row each), then the same at every
    other W_max of --w-max-sweep."""
    read = {f"read_{k}": v for k, v in pt.read_cost.items()}  # the task's attention read
    meta = task.get("meta") or {}
    level = needle_level(pt)
    first = len(run.rows)
    for p in tqdm(policies, desc=str(task["id"]), disable=not args.progress, leave=False):
        t0 = time.perf_counter()
        r = answer_task(p, pt, oracle, args.world)
        run.spent[p.name] = run.spent.get(p.name, 0.0) + time.perf_counter() - t0
        row = {
            "id": task["id"],
            "line": line,
            "policy": p.name,
            "n_tokens": pt.n_tokens,
            "w_max": args.world.w_max,
            "length": meta.get("length", pt.n_tokens),
            "depth": meta.get("depth"),
            "kind": meta.get("kind"),
            "group": str(meta.get("module", task["id"])),
            "needle_level": level,
            **read,
            **r,
        }
        run.rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
    for w_max in dict.fromkeys(w for w in args.w_max_sweep if w != args.world.w_max):
        try:
            run.sweep_rows.setdefault(w_max, []).extend(
                _at_budget(w_max, pt, run.rows[first:], policies, oracle, args.world)
            )
        except TaskError as err:  # this budget cannot hold the stream: that W_max only
            msg = f"{args.tasks}: line {line}: W_max {w_max}: {err}"
            print(f"error: {msg} (skipped at this W_max)", file=sys.stderr)
            run.sweep_errors.setdefault(w_max, []).append({"line": line, "error": msg})


def _report(args: EvaluateArgs, run: _Run, policies: list, gister_name: str,
            lens_path: str | None) -> dict:
    """results.json's content (timings and versions aside): the configuration, each policy's
    summary and grid, LensNet's cost per round against one LM forward at W_max, the read cost."""
    summary, grid = summarise(run.rows, [p.name for p in policies])
    # the cost yardstick: an answer forward over a W_max context (every policy but full; resumed
    # rows too)
    lm_forward_s = [r["lm_forward_s"] for r in run.rows if "lm_forward_s" in r]
    fwd = float(np.mean(lm_forward_s)) if lm_forward_s else None
    lens_names = [p.name for p in policies if isinstance(p, LensNetPolicy)]
    for name in lens_names:  # per round: LensNet + features + allocator vs one LM forward at W_max
        if fwd and name in summary:  # the faithful re-read of each refocused context apart
            s, per_round = summary[name], 1e-3 / max(summary[name]["rounds"], 1) / fwd
            s["cost_vs_lm_forward"] = (s["policy_ms"] - s["reread_ms"]) * per_round
            s["reread_vs_lm_forward"] = s["reread_ms"] * per_round
    return {
        "config": {
            "read_mode": args.world.read_mode,
            "w_max": args.world.w_max,
            "tail_tokens": args.world.tail_tokens,
            "zoom_rounds": args.world.rounds,
            "lookahead": args.world.lookahead,
            "block_size": args.world.block_size,
            "max_level": args.world.max_level,
            "tasks": args.tasks,
            "max_tasks": args.max_tasks,
            "lm": args.lm,
            "gister": gister_name,
            "lensnet": lens_path,
            "lensnet_trained_read_mode": trained_read_mode(lens_path),
            "lensnets": {s.partition("=")[0]: portable_path(s.partition("=")[2])
                         for s in args.lensnets},
            "policies": [p.name for p in policies],
            "seed": args.seed,
            "args": to_dict(args),
        },
        "policies": summary,
        "grid": grid,
        "errors": run.errors,
        "n_tasks": run.n_evaluated,
        "lm_forward_ms_at_w_max": None if fwd is None else 1e3 * fwd,
        "read_cost": read_cost_summary(run.rows, args.world.read_mode),
    }


def _write_sweep(out: Path, results: dict, run: _Run, policies: list) -> None:
    """--w-max-sweep: a run folder per other W_max (``OUT/w-N``) and the compression plot."""
    from analysis.plots import compression_sweep

    dirs = [out]
    for w_max, w_rows in run.sweep_rows.items():
        dirs.append(out / f"w-{w_max}")
        dirs[-1].mkdir(exist_ok=True)
        (dirs[-1] / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in w_rows))
        w_summary, w_grid = summarise(w_rows, [p.name for p in policies])
        w_results = {
            "config": {**results["config"], "w_max": w_max},
            "policies": w_summary,
            "grid": w_grid,
            "n_tasks": len({r["id"] for r in w_rows}),
            "errors": run.errors + run.sweep_errors.get(w_max, []),
        }
        (dirs[-1] / "results.json").write_text(json.dumps(w_results, indent=1))
    compression_sweep(dirs, out / "sweep")


def read_cost_summary(rows: list[dict], mode: str) -> dict | None:
    """What the attention inputs cost to read, over the tasks of ``rows`` that read them: positions
    the LM ran per stream token (a full read runs 1; the faithful read runs each stream forward
    over its working context, plus one question-time forward), forwards and seconds per task.
    Zoom rounds' re-reads are in each policy's ``policy_s``. None when no policy read attention."""
    costs = {r["id"]: r for r in rows if "read_positions" in r}  # one per task
    if not costs:
        return None
    tokens = sum(c["n_tokens"] for c in costs.values())
    return {
        "mode": mode,
        "tasks": len(costs),
        "positions_per_token": sum(c["read_positions"] for c in costs.values()) / tokens,
        "forwards_per_task": float(np.mean([c["read_forwards"] for c in costs.values()])),
        "seconds_per_task": float(np.mean([c["read_seconds"] for c in costs.values()])),
    }


def _command(args: EvaluateArgs) -> str:
    """The run's command line as command.txt records it (without --resume)."""
    argv = to_argv(replace(args, resume=False))
    return " ".join(["python -m sim.evaluate", *map(shlex.quote, argv)]) + "\n"


def _check_resumable(out: Path, same_run: str, digest: str) -> None:
    """``--resume``: a ``ConfigError`` when ``out`` holds another command's run, or a run of this
    command over another version of the task file (its ``tasks.sha256``; runs from before it was
    recorded have none). ``same_run``: the command with ``--max-tasks`` left at its default, which
    a resumed run may change; ``digest``: the task file's sha256 now."""
    if not (out / "tasks.jsonl").exists():
        return
    before = (out / "command.txt").read_text() if (out / "command.txt").exists() else None
    if before is None or _without_max_tasks(before) != same_run:
        raise ConfigError(
            f"--resume: {out} holds another run (command.txt: {before!r}); resume with the same "
            "arguments or use a new --out"
        )
    recorded = out / "tasks.sha256"
    if recorded.exists() and recorded.read_text().split()[0] != digest:
        raise ConfigError(
            f"--resume: the task file changed since {out} was started (tasks.sha256: "
            f"{recorded.read_text().split()[0][:12]}..., now {digest[:12]}...): its rows would "
            "mix two sets of tasks; use a new --out"
        )


def _without_max_tasks(command: str) -> str:
    """``command`` (a command.txt) with its ``--max-tasks N`` removed."""
    return re.sub(r" --max-tasks \d+(?= |\n|$)", "", command)


def _resumed_rows(out: Path, policies: list[str]) -> list[dict]:
    """The rows of an interrupted run in ``out`` to keep (``--resume``): the rows of ``policies``
    of each task that has a row for every one of them; a task cut off between policies runs again,
    and a last line cut off mid-write (the run was killed) is dropped. ``tasks.jsonl`` is rewritten
    with the kept rows."""
    path = out / "tasks.jsonl"
    if not path.exists():
        return []
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    rows = []
    for k, x in enumerate(lines):
        try:
            rows.append(json.loads(x))
        except json.JSONDecodeError:
            if k < len(lines) - 1:  # only the last line can be cut off by a kill
                raise ConfigError(f"--resume: {path}: line {k + 1} is not JSON") from None
    per_task: dict[str, list[dict]] = {}
    for r in rows:
        per_task.setdefault(r["id"], []).append(r)
    # a task with a row for every policy keeps those rows (a rank twin run by an older version,
    # now left out as the same policy, drops out)
    keep = [r for rs in per_task.values() if {x["policy"] for x in rs} >= set(policies)
            for r in rs if r["policy"] in policies]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return keep


def _at_budget(
    w_max: int, pt, main_rows: list[dict], policies: list, oracle, world: TaskWorldConfig
) -> list[dict]:
    """One task's rows at another W_max (``with_budget``: the same block features, the cover (and
    in the faithful mode the stream's keys) read again); a policy that reads every token keeps its
    row (the budget does not touch it)."""
    from sim.taskworld.world import with_budget

    config = replace(world, w_max=w_max)
    pt_w = with_budget(pt, config, oracle)
    level = needle_level(pt_w)
    out = []
    for p, row in zip(policies, main_rows, strict=True):
        r = {} if p.reads_everything else answer_task(p, pt_w, oracle, config)
        out.append({**row, **r, "w_max": w_max, "needle_level": level})
    return out


def format_results(results: dict) -> str:
    rows = [
        f"W_max {results['config']['w_max']}, {results['n_tasks']} tasks, zoom rounds "
        f"{results['config']['zoom_rounds']}, gister {results['config']['gister']}",
        "policy       exact match   answer NLL   focus recall   rounds  expands   N/W_max   NGR "
        "[95% CI]",
    ]
    for name, r in results["policies"].items():
        if not r["n"]:
            rows.append(f"{name:12s}  skipped on {r['skipped']} tasks: {r['skipped_why']}")
            continue
        rec = "   -  " if r["focus_recall"] is None else f"{r['focus_recall']:6.3f}"
        ngr = "" if r.get("ngr") is None else f"{r['ngr']:6.3f}"
        if r.get("ngr_ci95"):
            ngr += f" [{r['ngr_ci95'][0]:.2f}, {r['ngr_ci95'][1]:.2f}]"
        rows.append(
            f"{name:<12} {r['exact_match']:8.3f}     {r['answer_nll']:8.3f}      {rec}       "
            f"{r['rounds']:5.2f}  {r['expands']:6.2f}   {r['compression']:6.1f}   {ngr}"
        )
    if results["errors"]:
        rows.append(f"{len(results['errors'])} task line(s) skipped: see results.json 'errors'")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    _, results = run_cli(EvaluateArgs, evaluate_tasks, argv, (ConfigError, FileNotFoundError))
    sys.exit(1 if results["errors"] else 0)


if __name__ == "__main__":
    main()
