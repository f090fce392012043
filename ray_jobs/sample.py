"""`ray job submit --working-dir . -- python ray_jobs/sample.py RUN_OR_EXPORT [--n 64] [--out grid.png] ...`

Thin entry point for facediff sample: a PNG grid of samples from a trained model.
Paths (configs are relative to the working directory; data, storage_path and outputs) must be readable and
writable from every node that runs the job's tasks: shared storage (NFS) on a cluster.
"""

from _connect import run

if __name__ == "__main__":
    run("sample", "sample.py")
