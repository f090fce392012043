"""What `facediff evaluate` measured and how: the protocol printed before sampling starts and saved with the
value in `evaluation.json`, so a distance never travels without its split, sample count, sampler, steps,
metric and the weights it scored (a distance at 50 DDIM steps on 300 test faces is not one at 25 on 6)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

from facediff.config.schema import ExperimentConfig
from facediff.data.shards import atomic_write_text
from facediff.storage import RunStorage, is_remote

EVALUATION_FILE = "evaluation.json"


def describe(cfg: ExperimentConfig, split: str, records: int, source: dict, device: str) -> dict:
    """The protocol of one evaluation: where the real images come from, how the samples are drawn, by what."""
    e = cfg.eval
    protocol = {
        "split": split,
        "split_records": records,  # every one feeds the real statistics
        "dataset": str(cfg.data.path),
        # one sample per record (conditioned on it for conditional families), or eval.num_samples in all
        "num_samples": e.num_samples if e.num_samples is not None else records,
        "samples_from": "one per record" if e.num_samples is None else "eval.num_samples",
        "sampler": e.sampler,
        "steps": e.steps,
        "seed": e.seed,
        "image_size": cfg.data.image_size,
        # FID/KID as torch-fidelity computes them (docs/evaluation.md#reference-protocol); intervals over the samples
        "bootstrap_resamples": e.bootstrap,
        "model": source,
        "device": device,
    }
    if cfg.model.family == "lc_unet":
        protocol["guidance"] = {"attribute": e.attribute_guidance, "mask": e.mask_guidance}
    elif (scale := getattr(cfg.model, "guidance_scale", None)) is not None:
        protocol["guidance"] = {"scale": scale}
    return protocol


def weights_text(source: dict) -> str:
    if source["kind"] == "run checkpoint":
        return f"EMA weights of {source['path'].rstrip('/')}/{source['checkpoint']} (step {source['step']})"
    if source["kind"] == "export":
        return f"exported EMA weights in {source['path']}"
    return f"{source['path']} untrained ({source['weights']})"


def protocol_lines(protocol: dict, metric: str) -> list[str]:
    """Printed before the samples are drawn (they can take hours): what the number will be."""
    p = protocol
    guidance = "".join(f", guidance {k} {v:g}" for k, v in p.get("guidance", {}).items())
    caveat = {"fid": "", "fd_mtcnn_onet": " (not FID: the Inception weights could not be had; not comparable with "
                                          "published FIDs)"}.get(metric, " (not FID)")
    lines = [
        f"model: {weights_text(p['model'])}",
        f"real: split {p['split']!r} of {p['dataset']} ({p['split_records']} records, {p['image_size']} px)",
        f"samples: {p['num_samples']} ({p['samples_from']}), sampler {p['sampler']}, {p['steps']} steps, "
        f"seed {p['seed']}{guidance}, on {p['device']}",
        f"metric: {metric}{caveat} and {kernel_name(metric)}, as torch-fidelity computes them"
        + (f"; 95% intervals from {p['bootstrap_resamples']} bootstrap resamples of the samples"
           if p.get("bootstrap_resamples") else ""),
    ]
    if (seg := p.get("mask_segmenter")) is not None:  # runs/mask_adherence.py
        known = ([f"trained at {seg['image_size']} px"] if "image_size" in seg else []) \
            + ([f"its test mIoU {seg['test_miou']:.3f}"] if "test_miou" in seg else [])
        lines.append(f"mask adherence: part segmenter {seg['path']}" + (f" ({', '.join(known)})" if known else "")
                     + ": mIoU of each sample vs the masks it was conditioned on, and of the real faces vs theirs")
    return lines


def kernel_name(metric: str) -> str:
    """KID beside FID; the fallback's kernel distance is labelled like its Fréchet distance (kd_mtcnn_onet)."""
    return "kid" if metric == "fid" else "kd_" + metric.removeprefix("fd_")


def result_lines(evaluation: dict) -> list[str]:
    """`fid 41.2 [38.9, 44.0]` and `kid 0.031 [0.025, 0.038]`: each value with its 95% interval when measured."""
    results, lines = evaluation["results"], []
    for name in (evaluation["metric"], kernel_name(evaluation["metric"])):
        if name in results:
            lo, hi = results.get(f"{name}_lo"), results.get(f"{name}_hi")
            lines.append(f"{name} {results[name]:.6g}" + (f" [{lo:.6g}, {hi:.6g}] (95%)" if lo is not None else ""))
    if "mask_miou" in results:
        lines.append(f"mask_miou {results['mask_miou']:.4g} (real faces: {results['mask_miou_real']:.4g})")
    return lines


def facediff_commit() -> str | None:
    """The commit of the facediff checkout this runs from; None when installed outside one (git would answer
    for whatever repository encloses site-packages)."""
    checkout = Path(__file__).resolve().parents[2]  # <checkout>/facediff/eval/protocol.py
    if not (checkout / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def record(protocol: dict, metric: str, results: dict[str, float], overrides: list[str]) -> dict:
    return {
        "metric": metric,
        "value": results[metric],
        "results": results,  # the distance and what the family adds (attr_acc, face_rate, ...)
        "protocol": protocol,
        "overrides": list(overrides),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "facediff_commit": facediff_commit(),
    }


def check_out(out: Path | None) -> None:
    """`--out`, refused before any sample is drawn when it cannot be written."""
    if out is None:
        return
    out = Path(out)
    if out.is_dir() or out.suffix != ".json":
        raise ValueError(f"--out {out}: not a .json file name; e.g. --out {out / EVALUATION_FILE}"
                         if out.is_dir() else f"--out {out}: end it in .json")
    existing = next(p for p in (out.absolute().parent, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"--out {out}: {existing} is not a writable folder")


def save(evaluation: dict, out: Path | None) -> str | None:
    """Into `out`, else into the run folder (local or remote) or export evaluated; an untrained config has no
    folder of its own, so without `out` nothing is written (None). Atomic: a temporary sibling renamed over the
    file locally, one whole object in a store."""
    source = evaluation["protocol"]["model"]
    if out is None and source["kind"] == "untrained config":
        return None
    if out is None and is_remote(source["path"]):
        parent, _, name = source["path"].rstrip("/").rpartition("/")
        storage = RunStorage(parent, name)
        _write(evaluation, storage.local / EVALUATION_FILE)
        storage.push(EVALUATION_FILE)
        return f"{storage.uri}/{EVALUATION_FILE}"
    target = Path(out) if out is not None else Path(source["path"]) / EVALUATION_FILE
    _write(evaluation, target)
    return str(target)


def _write(evaluation: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(evaluation, indent=2) + "\n")
