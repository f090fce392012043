"""`ray job submit --working-dir . -- python ray_jobs/tune.py GRID [key=value ...]`

Thin entry point for facediff tune: an ablation grid with ASHA; outputs under the grid's storage_path.
Paths (configs are relative to the working directory; data, storage_path and outputs) must be readable and
writable from every node that runs the job's tasks: shared storage (NFS) on a cluster.
"""

from _connect import run

if __name__ == "__main__":
    run("tune", "tune.py")
