"""`ray job submit --working-dir . -- python ray_jobs/train.py CONFIG [key=value ...]`

Thin entry point for facediff train: fit (or resume) a run; outputs under trainer.storage_path.
Paths (configs are relative to the working directory; data, storage_path and outputs) must be readable and
writable from every node that runs the job's tasks: shared storage (NFS) on a cluster.
"""

from _connect import run

if __name__ == "__main__":
    run("train", "train.py")
