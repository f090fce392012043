"""The end of an experiment: the results table (CSV + Markdown), the metric-against-kimg plot, the best trial.

A trial counts as stopped early when it ended without error before the trials' length in kimg (ASHA stopped
it); its kimg reached is the furthest its Train run logged (`metrics.jsonl`), which can be a little past the
report ASHA acted on.
"""

from __future__ import annotations

import csv
import json
import math
import posixpath
from pathlib import Path
from typing import Any

from facediff.train.checkpoint import latest_complete
from facediff.storage import RunStorage
from facediff.train.progress import METRICS_FILE, read_metrics
from facediff.tune.space import Experiment

TABLE, MARKDOWN, PLOT, BEST = "results.csv", "results.md", "metric_vs_kimg.png", "best.json"


def trial_rows(results, exp: Experiment) -> list[dict[str, Any]]:
    """One row per trial (sorted by trial id): its sampled values, best metric, kimg reached, outcome."""
    rows = []
    for result in results:
        trial_id = posixpath.basename(result.path.rstrip("/"))
        run = exp.trial_run(trial_id)
        run.pull(METRICS_FILE)  # remote storage: into the local mirror
        history = result.metrics_dataframe
        points = []
        if history is not None and exp.metric in history:
            points = [(float(k), float(m)) for k, m in zip(history["kimg"], history[exp.metric])
                      if not (math.isnan(k) or math.isnan(m))]
        logged = [r["kimg"] for r in read_metrics(run.local)]
        kimg = max([k for k, _ in points] + logged, default=0.0)
        values = [m for _, m in points]
        best = (min(values) if exp.grid.mode == "min" else max(values)) if values else None
        if result.error is not None:
            outcome = "error"
        elif kimg < exp.total_kimg - 1e-9:
            outcome = "stopped early"
        else:
            outcome = "completed"
        paper = exp.grid.paper_row(result.config or {})
        rows.append({
            "trial": trial_id,
            **{key: (result.config or {}).get(key) for key in exp.grid.search_space},
            **({"paper_row": paper.row if paper else ""} if exp.grid.paper_rows else {}),
            f"best_{exp.metric}": best,
            **({"paper_fid": paper.fid if paper else None} if exp.grid.paper_rows else {}),
            "kimg": round(kimg, 6),
            "stopped_early": outcome == "stopped early",
            "outcome": outcome if result.error is None else f"error: {type(result.error).__name__}",
            "checkpoint": _newest_checkpoint(run),
            "_points": points,
        })
    return sorted(rows, key=lambda r: r["trial"])


def _newest_checkpoint(run: RunStorage) -> str:
    """What `facediff sample` would load: the newest complete checkpoint folder; in remote storage, the newest
    one Ray registered (it registers a checkpoint only once every rank's upload finished)."""
    if run.remote:
        from facediff.train.run import resume_point

        name = resume_point(run).checkpoint
        return f"{run.uri}/{name}" if name else ""
    found = latest_complete(run.local)
    return str(found) if found else ""


def _columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if not k.startswith("_")] if rows else []


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_table(rows: list[dict], exp: Experiment) -> tuple[Path, Path]:
    cols = _columns(rows)
    csv_path, md_path = exp.dir / TABLE, exp.dir / MARKDOWN
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# {exp.name}", "",
        f"Grid: `{exp.grid_path}`" + (f"; reproduces: {exp.grid.reproduces}" if exp.grid.reproduces else ""),
        f"Metric: `{exp.metric}` ({exp.grid.mode})" + (
            f", requested as `{exp.grid.metric}`" if exp.metric != exp.grid.metric else ""),
        f"Scheduler: {exp.grid.scheduler.kind}; trials train {exp.total_kimg} kimg",
        *(["`paper_fid`: the FID the paper printed for the row (blank: the grid point is not a row of the paper)"
           + ("" if exp.metric == "fid" else f"; `{exp.metric}` is not FID and not comparable with it")]
          if exp.grid.paper_rows else []),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_metric(rows: list[dict], exp: Experiment) -> Path:
    """The metric against kimg, one line per trial; a cross marks where a stopped trial ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r["_points"]:
            continue
        label = r["trial"] + " " + ", ".join(f"{k.split('.')[-1]}={_fmt(r[k])}" for k in exp.grid.search_space)
        line, = ax.plot(*zip(*r["_points"]), marker="o", label=label[:60])
        if r["stopped_early"]:
            ax.plot(*r["_points"][-1], marker="x", markersize=12, color=line.get_color())
    ax.set_xlabel("kimg")
    ax.set_ylabel(exp.metric)
    ax.set_title(f"{exp.name}: {exp.metric} ({exp.grid.mode}); x = stopped early")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = exp.dir / PLOT
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def best_trial(rows: list[dict], exp: Experiment) -> dict | None:
    key = f"best_{exp.metric}"
    scored = [r for r in rows if r[key] is not None]
    if not scored:
        return None
    best = (min if exp.grid.mode == "min" else max)(scored, key=lambda r: r[key])
    summary = {k: best[k] for k in _columns(rows)}
    summary["metric"] = exp.metric
    (exp.dir / BEST).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
