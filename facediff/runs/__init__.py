"""Run artefacts read back: a run folder's checkpoints, its export, a run in remote storage, and a model loaded
from any of them (`load.load_model`) or evaluated (`evaluate.evaluate_run`).

Above the trainer (it reads what `train/checkpoint.py` writes), below the commands that sample and evaluate."""
