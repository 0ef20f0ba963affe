"""Shared core of the missing-modality BraTS toolkit: data, preprocessing, training, evaluation, model registry."""

__version__ = "0.1.0"
