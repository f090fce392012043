"""Offline preparation (`facediff prepare ...`): a dataset release (CelebAMask-HQ, COCO 2017) or prepared shards
(`latents`) turned into Parquet shards once, before training."""
