"""`ray job submit --working-dir . -- python ray_jobs/prepare.py celebamask ROOT OUT [options]`

Thin entry point: the same code as `facediff prepare ...`, run by the job driver on the cluster. ROOT and OUT
must be on storage the driver's node can read and write (shared NFS, or a node-local path to copy from).
"""

import sys

from facediff.cli.main import app

if __name__ == "__main__":
    sys.exit(app(["prepare", *sys.argv[1:]], prog_name="ray_jobs/prepare.py"))
