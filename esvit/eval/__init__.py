"""Evaluation: kNN, linear probes and feature extraction.

``esvit.eval.knn(...)`` (the callable :mod:`esvit.eval.knn` module) runs :func:`knn_eval`;
results that cannot mean anything are refused and every number records what it was computed on
(:mod:`esvit.eval.validity`); output folders are written through a ledger
(:mod:`esvit.eval.outputs`) and decoding waits are bounded (:mod:`esvit.eval.loader`);
``esvit.eval.linear_probe(...)`` trains and evaluates a linear classifier; both read features
through one shared cache (:mod:`esvit.eval.cache`). Images are prepared by
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
from esvit.eval.loader import LoaderStalledError
from esvit.eval.outputs import FolderBusyError, ForeignFilesError, OutputFolder
from esvit.eval.validity import EvalBasis, MeaninglessEvaluationError

__all__ = [
    "FEATURE_MODES",
    "PREPROCESS_MODES",
    "EvalBasis",
    "EvalPreprocess",
    "FeatureEncoder",
    "FolderBusyError",
    "ForeignFilesError",
    "LabeledImages",
    "LinearClassifier",
    "LoaderStalledError",
    "MeaninglessEvaluationError",
    "OutputFolder",
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
