"""Evaluation: kNN, linear probes and feature extraction."""

from esvit.eval.features import extract_features, preprocess
from esvit.eval.knn import knn_accuracy, knn_predict

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "preprocess"]
