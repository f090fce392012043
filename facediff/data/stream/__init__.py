"""Streaming prepared shards into training and evaluation: Ray Data pipelines (`dataset.py`, `coco.py`), epochs read
in passes (`passes.py`) and the batch finished on the worker's device (`batch.py`)."""
