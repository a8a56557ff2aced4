"""Evaluation: kNN, linear probes and feature extraction.

``esvit.eval.knn(...)`` (the callable :mod:`esvit.eval.knn` module) runs :func:`knn_eval`;
``esvit.eval.linear_probe(...)`` trains and evaluates a linear classifier. Images are prepared by
an :class:`~esvit.eval.features.EvalPreprocess` protocol (``preprocess="auto"|"dino"|"resize"``,
see :func:`~esvit.eval.features.resolve_preprocess`), recorded in every results file.
"""

from esvit.eval.features import (
    FEATURE_MODES,
    PREPROCESS_MODES,
    EvalPreprocess,
    FeatureEncoder,
    LabeledImages,
    extract_features,
    labeled_splits,
    last_n_taps,
    preprocess,
    register_last_n,
    resolve_eval_model,
    resolve_preprocess,
)
from esvit.eval.knn import knn_accuracies, knn_accuracy, knn_eval, knn_neighbors, knn_predict
from esvit.eval.linear import (
    LinearClassifier,
    linear_probe,
    train_linear_lbfgs,
    train_linear_sgd,
)

__all__ = [
    "FEATURE_MODES",
    "PREPROCESS_MODES",
    "EvalPreprocess",
    "FeatureEncoder",
    "LabeledImages",
    "LinearClassifier",
    "extract_features",
    "knn_accuracies",
    "knn_accuracy",
    "knn_eval",
    "knn_neighbors",
    "knn_predict",
    "labeled_splits",
    "last_n_taps",
    "linear_probe",
    "preprocess",
    "register_last_n",
    "resolve_eval_model",
    "resolve_preprocess",
    "train_linear_lbfgs",
    "train_linear_sgd",
]
