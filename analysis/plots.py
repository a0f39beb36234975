"""Plots drawn from a run directory's files alone (``python -m analysis.plots RUN_DIR``).

Reads ``metrics.jsonl`` (training log), ``results.json`` (policy comparison) and ``focus.jsonl``
(one held-out document's focus per policy) and writes PNGs into ``RUN_DIR/plots``: training curves
per loss term, validation metrics over steps, NLL per policy with spread over documents, the NLL gap
to the oracle and NGR against the budget W_max (when ``results.json`` holds a budget sweep), and a
focus heat map (token positions x steps, coloured by the level covering them; in the synthetic world
the blocks that the next H tokens refer to are marked) per policy; for a ``sim.evaluate`` task run,
exact match by needle depth x task length per policy; with ``scores.npz``, LensNet's calibrated
held-out scores per action kind against the allocator's thresholds. ``--sweep OUT RUN...`` draws
exact match and answer NLL against the compression ratio from ``sim.evaluate`` runs at
several W_max; ``--lengths OUT RUN...`` exact match against the stream's length from runs of task
files of different lengths at one W_max.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(log: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in log]
    for key in ("loss/total", "loss/reg", "loss/rank", "loss/budget", "loss/illegal"):
        vals = np.array([r.get(key, np.nan) for r in log], dtype=float)
        if len(vals) > 20:  # a running mean keeps the curves readable
            k = max(1, len(vals) // 50)
            vals = np.convolve(vals, np.ones(k) / k, mode="same")
        ax.plot(steps, vals, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (running mean)")
    ax.set_title("LensNet training loss by term")
    ax.legend(fontsize=8)
    return _save(fig, out / "training_curves.png")


def validation_metrics(log: list[dict], out: Path) -> Path:
    evals = [r for r in log if "val/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in (
        "val/ranking_accuracy",
        "val/pearson",
        "val/legality_compliance_raw",
        "val/budget_balance",
    ):
        ax.plot(
            [r["step"] for r in evals],
            [np.nan if r.get(key) is None else r[key] for r in evals],
            marker="o",
            label=key,
        )
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in evals], [r["val/loss"] for r in evals], "k--", label="val/loss")
    ax2.set_ylabel("val loss")
    ax.set_xlabel("step")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Validation metrics")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out / "validation_metrics.png")


def policy_nll(results: dict, out: Path) -> Path:
    pol = results["policies"]
    names = list(pol)
    fig, ax = plt.subplots(figsize=(7, 4))
    means = [pol[n]["nll"] for n in names]
    sds = [pol[n]["nll_std_over_docs"] for n in names]
    ax.bar(
        names, means, yerr=sds, capsize=4, color=["C0" if n == "lensnet" else "C7" for n in names]
    )
    for i, n in enumerate(names):
        ax.scatter(
            [i] * len(pol[n]["nll_per_doc"]), pol[n]["nll_per_doc"], s=8, color="k", zorder=3
        )
    lo = min(min(pol[n]["nll_per_doc"]) for n in names)
    hi = max(max(pol[n]["nll_per_doc"]) for n in names)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_ylabel("mean NLL of the next H tokens")
    ax.set_title(
        f"Held-out NLL per policy (W_max={results['w_max']}, seed {results['seed']}); dots = "
        "documents"
    )
    return _save(fig, out / "policy_nll.png")


def budget_sweep(results: dict, out: Path) -> Path | None:
    sweep = results.get("budget_sweep") or {}
    if len(sweep) < 2:
        return None
    budgets = sorted(sweep, key=int)
    xs = [int(b) for b in budgets]
    names = list(sweep[budgets[0]])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        style = dict(marker="o", lw=2.5 if name == "lensnet" else 1.2)
        gap = [sweep[b][name]["nll"] - sweep[b]["oracle"]["nll"] for b in budgets]
        ax1.plot(xs, gap, label=name, **style)
        if name != "oracle":
            ax2.plot(
                xs,
                [
                    np.nan if sweep[b][name]["ngr"] is None else sweep[b][name]["ngr"]
                    for b in budgets
                ],
                label=name,
                **style,
            )
    ax1.set_xlabel("W_max (entries)")
    ax1.set_ylabel("NLL - NLL(greedy oracle)")
    ax1.set_title("NLL gap to the oracle vs budget")
    ax1.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.5, ls=":")
    ax2.axhline(0.0, color="k", lw=0.5, ls=":")
    ax2.set_xlabel("W_max (entries)")
    ax2.set_ylabel("NGR = (recency - policy) / (recency - oracle)")
    ax2.set_title("NLL-gap recovered vs budget")
    fig.suptitle(
        f"Held-out documents, seed {results['seed']} (LensNet trained at W_max={results['w_max']})",
        fontsize=9,
    )
    return _save(fig, out / "budget_sweep.png")


def focus_heatmap(focus: list[dict], out: Path) -> Path:
    names = list(dict.fromkeys(r["policy"] for r in focus))
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 * len(names) + 0.5), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        rows = [r for r in focus if r["policy"] == name]
        t_max = rows[-1]["T"]
        # x: token position (what the slot covers), y: step; colour: level of the entry covering it
        img = np.full((len(rows), t_max), np.nan)
        for y, r in enumerate(rows):
            starts = np.asarray(r["starts"] + [r["T"]])
            for lv, a, b in zip(r["levels"], starts[:-1], starts[1:], strict=True):
                img[y, a:b] = lv
        ax.imshow(
            img,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis_r",
            vmin=0,
            vmax=max(2, np.nanmax(img)),
        )
        if any(
            "referenced" in r for r in rows
        ):  # synthetic world: the blocks the next H tokens need
            pts = [
                (blk * r["block_size"] + r["block_size"] / 2, y)
                for y, r in enumerate(rows)
                for blk in r.get("referenced", [])
            ]
            if pts:
                px, py = zip(*pts, strict=True)
                ax.scatter(px, py, s=4, c="red", marker="s", linewidths=0)
        ax.set_ylabel(name, rotation=0, ha="right", fontsize=8)
        ax.set_yticks([])
    axes[-1, 0].set_xlabel(
        "token position (colour: level of the entry covering it; yellow = L0; "
        "red: blocks the next H tokens refer to)"
    )
    fig.suptitle("Focus over one held-out document (rows = refocus steps)")
    return _save(fig, out / "focus_heatmap.png")


def task_grid(results: dict, out: Path) -> Path:
    """Exact match by needle depth x task length, one panel per policy (``sim.evaluate`` results).
    """
    grid = results["grid"]
    names = list(grid)

    def order(
        key: str,
    ) -> tuple[int, float | str]:  # numbers ascending, then labels ("None": no depth given)
        try:
            return 0, float(key)
        except ValueError:
            return 1, key

    lengths = sorted({n for g in grid.values() for n in g}, key=order)
    depths = sorted({d for g in grid.values() for ds in g.values() for d in ds}, key=order)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names) + 1, 2.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        m = np.full((len(lengths), len(depths)), np.nan)
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                m[i, j] = grid[name].get(n, {}).get(d, np.nan)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(depths)), depths, fontsize=7)
        ax.set_yticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_xlabel("depth", fontsize=8)
    axes[0][0].set_ylabel("tokens")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match")
    fig.savefig(out / "exact_match_grid.png", dpi=110)
    plt.close(fig)
    return out / "exact_match_grid.png"


def score_distribution(scores: dict, results: dict, out: Path) -> Path:
    """LensNet's calibrated scores on labelled held-out entries against the allocator's thresholds,
    one panel per action kind, with the exact labels of the same entries for comparison."""
    tau = 0.2  # the allocator's default tau_expand (the scores are already calibrated)
    cal = results.get("lensnet_calibration") or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    kinds = (
        ("expand candidates (gists)", scores["can_expand"]),
        (
            "collapse candidates (members of a legal group)",
            scores["can_collapse"] & ~scores["can_expand"],
        ),
    )
    for ax, (title, keep) in zip(axes, kinds, strict=True):
        u, y = scores["score"][keep], scores["label"][keep]
        if u.size:
            lo, hi = np.percentile(np.concatenate([u, y]), [0.5, 99.5])
            bins = np.linspace(min(lo, -tau), max(hi, 2 * tau), 60)
            ax.hist(y, bins=bins, alpha=0.45, color="C7", label="exact label y")
            ax.hist(u, bins=bins, alpha=0.6, color="C0", label="LensNet (calibrated)")
        if (
            ax is axes[0]
        ):  # an expand needs u > tau_expand; a paid one u + mean(payers' u) > tau_swap = 0
            ax.axvline(tau, color="C3", lw=1, ls="--", label=f"tau_expand = {tau}")
        ax.axvline(0.0, color="k", lw=0.6, ls=":", label="0 (tau_swap)")
        ax.set_yscale("log")
        ax.set_title(f"{title}: {int(keep.sum())} entries", fontsize=9)
        ax.set_xlabel("score (nats)")
        ax.legend(fontsize=7)
    scale = cal.get("score_scale", float(scores.get("score_scale", 1.0)))
    fig.suptitle(
        f"Held-out scores against the allocator's thresholds (score scale {scale:g}, fitted on "
        f"validation episodes; = tau_expand {tau / scale:.3g} on the raw scores)",
        fontsize=9,
    )
    return _save(fig, out / "score_distribution.png")


def compression_sweep(run_dirs: list[str | Path], out: Path) -> Path:
    """Exact match and answer NLL against the compression ratio (stream tokens / W_max), one curve
    per policy, from several ``sim.evaluate`` runs of the same tasks at different W_max (the plot
    KV-compression studies read first). Full context, which reads every token, is a level line.
    Also writes the numbers as ``compression_sweep.json`` beside the PNG. ``RUN1+RUN2`` merges the
    policies of runs of the same tasks at the same W_max (e.g. baselines from an earlier run;
    ``analysis.tables.load_merged``)."""
    from analysis.tables import load_merged

    runs = []
    for d in run_dirs:
        res = load_merged(str(d))
        if len({c["w_max"] for c in res["configs"]}) > 1:
            raise ValueError(f"{d}: the merged runs differ in W_max")
        runs.append({"config": res["configs"][0], "policies": res["policies"]})
    runs.sort(key=lambda r: r["config"]["w_max"], reverse=True)
    names = [n for n in runs[0]["policies"]  # a policy that could not run (n 0) has no point
             if all(n in r["policies"] and r["policies"][n]["n"] for r in runs)]
    table = {
        name: [
            {
                "w_max": r["config"]["w_max"],
                "compression": r["policies"][name]["compression"],
                "exact_match": r["policies"][name]["exact_match"],
                "exact_match_ci95": r["policies"][name].get("exact_match_ci95"),
                "answer_nll": r["policies"][name]["answer_nll"],
                "n": r["policies"][name]["n"],
            }
            for r in runs
        ]
        for name in names
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in table.items():
        x = [p["compression"] for p in pts]
        style = {"ls": "--", "color": "k"} if name == "full" else {"marker": "o"}
        if name == "full":  # reads all tokens: the same at every W_max
            x = [min(min(q["compression"] for q in v) for v in table.values()),
                 max(max(q["compression"] for q in v) for v in table.values())]
            pts = [pts[0], pts[0]]
        axes[0].plot(x, [p["exact_match"] for p in pts], label=name, **style)
        axes[1].plot(x, [p["answer_nll"] for p in pts], label=name, **style)
    for ax, label in zip(axes, ("exact match", "answer NLL (nats / token)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression (stream tokens / W_max)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression_sweep.json").write_text(json.dumps(table, indent=1))
    return _save(fig, out / "compression_sweep.png")


def length_curve(run_dirs: list[str | Path], out: Path) -> Path:
    """Exact match (with its 95 % interval) against the stream's length, one curve per policy, from
    ``sim.evaluate`` runs of task files of different lengths at one W_max (the unbounded-history
    plot: a curve per policy from 2k to 128k tokens). A policy that could not run at a length (full
    context past the LM's window: ``n`` 0) has no point there. ``RUN1+RUN2`` merges runs of the same
    tasks (``analysis.tables.load_merged``). Also writes ``length_curve.json``."""
    from analysis.tables import load_merged

    runs = []
    for d in run_dirs:
        res = load_merged(str(d))
        w_max = {c["w_max"] for c in res["configs"]}
        if len(w_max) > 1:
            raise ValueError(f"{d}: the merged runs differ in W_max")
        runs.append({"w_max": w_max.pop(), "policies": res["policies"]})
    if len({r["w_max"] for r in runs}) > 1:
        raise ValueError("the runs differ in W_max: one curve per policy needs one budget")
    table: dict[str, list[dict]] = {}
    for r in runs:
        for name, p in r["policies"].items():
            if p["n"]:
                table.setdefault(name, []).append({
                    "length": p["compression"] * r["w_max"],
                    "exact_match": p["exact_match"],
                    "exact_match_ci95": p.get("exact_match_ci95"),
                    "n": p["n"],
                })
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in table.items():
        pts.sort(key=lambda q: q["length"])
        x = [q["length"] for q in pts]
        y = [q["exact_match"] for q in pts]
        style = {"ls": "--", "color": "k"} if name == "full" else {"marker": "o"}
        line = ax.plot(x, y, label=name, **style)[0]
        ci = [q["exact_match_ci95"] for q in pts]
        if all(ci):
            ax.fill_between(x, [c[0] for c in ci], [c[1] for c in ci], alpha=0.1,
                            color=line.get_color())
    ax.set_xscale("log", base=2)
    n_at: dict[float, int] = {}  # tasks per length (the points' sample sizes differ)
    for pts in table.values():
        for q in pts:
            n_at[q["length"]] = max(n_at.get(q["length"], 0), q["n"])
    ax.set_xticks(sorted(n_at), [f"{x / 1024:.0f}k\nn={n_at[x]}" for x in sorted(n_at)])
    ax.minorticks_off()
    ax.set_xlabel(f"stream length (tokens; n tasks), W_max {runs[0]['w_max']}")
    ax.set_ylabel("exact match")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    (out / "length_curve.json").write_text(json.dumps(table, indent=1))
    return _save(fig, out / "length_curve.png")


def draw_all(run_dir: str | Path) -> list[Path]:
    run = Path(run_dir)
    out = run / "plots"
    out.mkdir(exist_ok=True)
    paths = []
    log = _jsonl(run / "metrics.jsonl")
    if log:
        paths += [training_curves(log, out), validation_metrics(log, out)]
    if (run / "results.json").exists():
        results = json.loads((run / "results.json").read_text())
        if "grid" in results:  # a sim.evaluate task run
            paths.append(task_grid(results, out))
        else:
            paths.append(policy_nll(results, out))
            if (p := budget_sweep(results, out)) is not None:
                paths.append(p)
            if (run / "scores.npz").exists():
                with np.load(run / "scores.npz") as z:
                    paths.append(score_distribution({k: z[k] for k in z.files}, results, out))
    focus = _jsonl(run / "focus.jsonl")
    if focus:
        paths.append(focus_heatmap(focus, out))
    if not paths:
        raise FileNotFoundError(f"{run}: no metrics.jsonl, results.json or focus.jsonl to plot")
    return paths


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "--sweep":  # --sweep OUT RUN_DIR...
        print(compression_sweep(argv[2:], Path(argv[1])))
        return
    if len(argv) >= 3 and argv[0] == "--lengths":  # --lengths OUT RUN_DIR...
        print(length_curve(argv[2:], Path(argv[1])))
        return
    if len(argv) != 1:
        raise SystemExit(
            "usage: python -m analysis.plots RUN_DIR | "
            "python -m analysis.plots --sweep OUT RUN[+RUN]... | "
            "python -m analysis.plots --lengths OUT RUN[+RUN]..."
        )
    for p in draw_all(argv[0]):
        print(p)


if __name__ == "__main__":
    main()
