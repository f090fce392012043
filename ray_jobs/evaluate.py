"""`ray job submit --working-dir . -- python ray_jobs/evaluate.py RUN_OR_EXPORT [--split test] [--set key=value ...]`

Thin entry point for facediff evaluate: FID (or the labelled fallback) of a trained model.
Paths (configs are relative to the working directory; data, storage_path and outputs) must be readable and
writable from every node that runs the job's tasks: shared storage (NFS) on a cluster.
"""

from _connect import run

if __name__ == "__main__":
    run("evaluate", "evaluate.py")
