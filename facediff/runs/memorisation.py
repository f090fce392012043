"""The memorisation audit of a finished run as one summary entry: what `facediff demo` reports for each face stage.

It is `facediff evaluate RUN --memorisation` in this process (`runs/evaluate.py`): one sample per held-out test
record with the run's `eval.sampler` and `eval.steps`, the audit of those same samples, `evaluation.json` and
`memorisation_pairs.png` in the run folder. The training and held-out embeddings come from the cache beside the
dataset (`eval/memorisation.py`), so only the first audit on a dataset pays for embedding its faces.
"""

from __future__ import annotations

import time
from pathlib import Path

from facediff.eval import protocol
from facediff.eval.memorisation import HELDOUT_PERCENTILE
from facediff.runs.evaluate import evaluate_run


def audit_run(model: str | Path, overrides: list[str] = (), device: str = "auto") -> dict:
    """The audit's numbers, protocol and files for the summary (`summary_line` prints it)."""
    start = time.time()
    evaluation = evaluate_run(model, overrides=list(overrides), device=device, memorisation=True)
    saved = protocol.save(evaluation, None)
    results, described = evaluation["results"], evaluation["memorisation"]
    return {
        "fraction": results["memorisation_fraction"], "threshold": results["memorisation_threshold"],
        "median_to_train": results["memorisation_median_to_train"],
        "heldout_median_to_train": results["memorisation_heldout_median_to_train"],
        "samples": described["samples"], "train_faces": described["train_faces"],
        "heldout_faces": described["heldout_faces"], "features": described["features"],
        "pairs_png": described["pairs_png"], "evaluation": saved, "seconds": round(time.time() - start, 1),
    }


def summary_line(audit: dict) -> str:
    """`  memorisation audit   0.0098 of 102 samples ... (features ...); closest pairs PATH` for the summary table."""
    features = ("fallback features: random-init InceptionResnetV1, finds copies, not look-alikes"
                if audit["features"] == "random_init" else f"features {audit['features']}")
    return (f"  memorisation audit             {audit['fraction']:.3g} of {audit['samples']} samples closer to one "
            f"of {audit['train_faces']} training faces than {HELDOUT_PERCENTILE:g}% of {audit['heldout_faces']} "
            f"held-out faces ({features}; {audit['seconds']:.0f} s); closest pairs {audit['pairs_png']}")
