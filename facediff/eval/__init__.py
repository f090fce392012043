"""Evaluation: image distances (FID or a fallback Fréchet distance) between real and generated faces."""

from facediff.eval.metrics import (
    ImageDistance,
    InceptionWeightsNotFound,
    MTCNNONetFeatures,
    build_image_distance,
    load_inception,
)

__all__ = ["ImageDistance", "InceptionWeightsNotFound", "MTCNNONetFeatures", "build_image_distance", "load_inception"]
