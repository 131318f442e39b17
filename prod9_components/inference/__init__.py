"""Inference helpers shared by the bundles."""

from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig

__all__ = ["AutoencoderInferenceWrapper", "SlidingWindowConfig"]
