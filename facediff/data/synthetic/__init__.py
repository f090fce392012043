"""The embedded synthetic datasets, written in the layout of the real releases: procedural faces (`celebamask.py`) and
people scenes (`coco.py`), rendered in a process pool (`parallel.py`)."""
