"""The end of an experiment: the results table (CSV + Markdown), the metric-against-kimg plot, the best trial.

A trial counts as stopped early when it ended without error before the trials' length in kimg (ASHA stopped
it); its kimg reached is the furthest its Train run logged (`metrics.jsonl`), which can be a little past the
report ASHA acted on.

"Best" is one report: a trial's best report is the one with the best metric (`mode`) among those it made to
Tune (every evaluation, for an image metric); `best_<metric>`, `best_kimg` and `checkpoint` all come from it.
In a trial every such report carries a checkpoint, and Ray Train keeps the best-scoring ones by the metric
besides the latest (`train.run.train(score=...)`), so that checkpoint is on disk even with `keep_last: 1`.
The experiment's best trial (`best.json`) is the trial with the best such report. With `eval.async_validation`
the reports of an image metric are the validation tasks' results, each carrying the kimg and the path of the
checkpoint it measured (`trial.MetricReportCallback.after_validation`): the same columns come from them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import posixpath
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from facediff.storage import RunStorage
from facediff.train.checkpoint import STATE_FILE
from facediff.train.run_log import METRICS_FILE, read_metrics
from facediff.tune.space import Experiment, is_image_metric

log = logging.getLogger("facediff.tune")
TABLE, MARKDOWN, PLOT, BEST = "results.csv", "results.md", "metric_vs_kimg.png", "best.json"


def trial_rows(results, exp: Experiment) -> list[dict[str, Any]]:
    """One row per trial (sorted by trial id): its sampled values, its best report (metric, kimg and checkpoint,
    all three from that one report), kimg reached, outcome."""
    rows = []
    for result in results:
        trial_id = posixpath.basename(result.path.rstrip("/"))
        run = exp.trial_run(trial_id)
        run.pull(METRICS_FILE)  # remote storage: into the local mirror
        reports = _reports(result.metrics_dataframe, exp.metric)
        logged = [r["kimg"] for r in read_metrics(run.local)]
        kimg = max([r[0] for r in reports] + logged, default=0.0)
        best = _best_report(reports, exp.grid.mode)
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
            f"best_{exp.metric}": best and best[1],
            # the paper's number right beside ours; the intervals and the kernel distance after it
            **({"paper_fid": paper.fid if paper else None} if exp.grid.paper_rows else {}),
            **_interval_columns(best, exp.metric),
            "best_kimg": best and best[0],
            "kimg": round(kimg, 6),
            "stopped_early": outcome == "stopped early",
            "outcome": outcome if result.error is None else f"error: {type(result.error).__name__}",
            "checkpoint": _scored_checkpoint(run, best, trial_id),
            "_points": [(k, m) for k, m, *_ in reports],
        })
    return sorted(rows, key=lambda r: r["trial"])


def kernel_metric(metric: str) -> str | None:
    """The kernel distance reported beside an image distance: kid beside fid, kd_<x> beside fd_<x>."""
    return "kid" if metric == "fid" else ("kd_" + metric[3:] if metric.startswith("fd_") else None)


def _interval_keys(metric: str) -> list[str]:
    """The bootstrap interval of the metric and the kernel distance with its interval (evaluation rows)."""
    kernel = kernel_metric(metric)
    return [f"{metric}_lo", f"{metric}_hi"] + ([kernel, f"{kernel}_lo", f"{kernel}_hi"] if kernel else [])


def _reports(history, metric: str) -> list[tuple[float, float, str | None, dict]]:
    """(kimg, metric, checkpoint folder name, the interval keys present) of each report the trial made to Tune."""
    if history is None or metric not in history:
        return []
    paths = history[CHECKPOINT_PATH_KEY] if CHECKPOINT_PATH_KEY in history else [None] * len(history)
    extra = [key for key in _interval_keys(metric) if key in history]
    rows = zip(history["kimg"], history[metric], paths, *(history[key] for key in extra))
    return [(float(k), float(m), posixpath.basename(p.rstrip("/")) if isinstance(p, str) else None,
             dict(zip(extra, map(float, rest))))
            for k, m, p, *rest in rows if not (math.isnan(k) or math.isnan(m))]


def _interval_columns(best: tuple | None, metric: str) -> dict[str, float | None]:
    """The best report's interval, KID and KID interval (None where the trials ran without eval.bootstrap)."""
    if not is_image_metric(metric):
        return {}
    found = best[3] if best else {}
    return {f"best_{key}" if key.startswith(metric) else key: found.get(key) for key in _interval_keys(metric)}


def _best_report(reports: list[tuple], mode: str) -> tuple | None:
    """The report with the best metric; among equal ones the latest, as Ray Train ranks checkpoints."""
    if not reports:
        return None
    sign = -1.0 if mode == "min" else 1.0
    return max(enumerate(reports), key=lambda item: (sign * item[1][1], item[0]))[1]


def _scored_checkpoint(run: RunStorage, best: tuple | None, trial_id: str) -> str:
    """Where the checkpoint of the trial's best report is (Ray Train keeps it by its score), or "" with a
    warning if that report has none or it is gone (e.g. an experiment run before checkpoints were scored)."""
    if best is None:
        return ""
    name = best[2]
    if name is None or not run.exists(f"{name}/{STATE_FILE}"):
        log.warning("trial %s: the checkpoint of its best report (%s kimg) is not in %s: %s", trial_id, best[0],
                    run.uri, name or "the report carries none")
        return ""
    return f"{run.uri}/{name}"


def _columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if not k.startswith("_")] if rows else []


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _cell(row: dict, col: str) -> str:
    """A value, with its 95% interval beside it when the row has one: `12.3 [10.9, 14.1]`."""
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if lo is None or hi is None or row[col] is None:
        return _fmt(row[col])
    return f"{_fmt(row[col])} [{_fmt(lo)}, {_fmt(hi)}]"


def write_table(rows: list[dict], exp: Experiment) -> tuple[Path, Path]:
    cols = _columns(rows)
    md_cols = [c for c in cols if not c.endswith(("_lo", "_hi"))]  # shown inside the value's cell
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
        *([f"Intervals: bootstrap 95% over each report's generated samples (`eval.bootstrap`); rows whose "
           "intervals overlap are not separable at this sample size."] if any(c.endswith("_lo") for c in cols)
          else []),
        "",
        "| " + " | ".join(md_cols) + " |",
        "|" + "---|" * len(md_cols),
    ]
    lines += ["| " + " | ".join(_cell(r, c) for c in md_cols) + " |" for r in rows]
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
