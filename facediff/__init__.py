"""facediff: distributed training of face diffusion models on Ray."""
