"""Distillation methods behind one registry (:func:`register_distiller`).

* :mod:`~esvit.distill.methods.stages`: stages of any backbone found by hooks
  (:func:`list_stages`, :func:`default_stages`) and :class:`FeatureTap`;
* :mod:`~esvit.distill.methods.registry`: :class:`Distiller`, :class:`Needs`,
  :class:`DistillInputs`, :class:`DistillContext`, the registry and :func:`forward_features`;
* logit methods: ``ce``, ``kd``, ``dkd``, ``dist``, ``deit_soft``, ``deit_hard``
  (:mod:`~esvit.distill.methods.logit`, wrapping :mod:`esvit.distill.losses`) and ``nkd``
  (:mod:`~esvit.distill.methods.nkd`);
* feature methods: ``fitnet`` (:mod:`~esvit.distill.methods.fitnet`), ``crd``
  (:mod:`~esvit.distill.methods.crd`), ``ofa`` (:mod:`~esvit.distill.methods.ofa`) and the
  label-free ``feature`` (:mod:`~esvit.distill.methods.feature`);
* :class:`MethodRunner` (:mod:`~esvit.distill.methods.runner`): one training step of any method.

See ``docs/distillation_methods.md`` for the formulas and the paper equations.
"""

from esvit.distill.methods import logit  # noqa: F401  (registers ce, kd, dkd, dist, deit_*)
from esvit.distill.methods.crd import CRD, ContrastMemory, CRDLoss, Embed, nce_loss
from esvit.distill.methods.feature import FEATURE_CRITERIA, FeatureDistiller, feature_distance
from esvit.distill.methods.fitnet import FitNet, HintRegressor, fitnet_loss
from esvit.distill.methods.nkd import NKD, NKDLoss, nkd_loss
from esvit.distill.methods.ofa import OFA, OFA_FORMS, OFABranch, ofa_loss
from esvit.distill.methods.registry import (
    DistillContext,
    Distiller,
    DistillInputs,
    Needs,
    build_distiller,
    forward_features,
    get_distiller,
    list_distillers,
    register_distiller,
)
from esvit.distill.methods.runner import MethodRunner
from esvit.distill.methods.stages import (
    FeatureTap,
    Stage,
    StageError,
    align_grid,
    candidate_stages,
    default_stages,
    describe_stages,
    final_stage,
    list_stages,
    stage_map,
    stage_tokens,
)

__all__ = [
    "CRD",
    "FEATURE_CRITERIA",
    "NKD",
    "OFA",
    "OFA_FORMS",
    "CRDLoss",
    "ContrastMemory",
    "DistillContext",
    "DistillInputs",
    "Distiller",
    "Embed",
    "FeatureDistiller",
    "FeatureTap",
    "FitNet",
    "HintRegressor",
    "MethodRunner",
    "NKDLoss",
    "Needs",
    "OFABranch",
    "Stage",
    "StageError",
    "align_grid",
    "build_distiller",
    "candidate_stages",
    "default_stages",
    "describe_stages",
    "feature_distance",
    "final_stage",
    "fitnet_loss",
    "forward_features",
    "get_distiller",
    "list_distillers",
    "list_stages",
    "nce_loss",
    "nkd_loss",
    "ofa_loss",
    "register_distiller",
    "stage_map",
    "stage_tokens",
]
