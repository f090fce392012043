"""`ray job submit --working-dir . -- python ray_jobs/prepare.py celebamask ROOT OUT [options]`

Thin entry point: the same code as `facediff prepare ...`, run by the job driver on the cluster. ROOT and OUT
must be on storage the driver's node can read and write (shared NFS, or a node-local path to copy from).
It joins no cluster itself: the steps that use Ray start it (`facediff.ray_start`).
"""

from _connect import run

if __name__ == "__main__":
    run("prepare", "prepare.py", join=False)
