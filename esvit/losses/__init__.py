"""Losses: pure modules that take tensors and the current temperature."""

from esvit.losses.center import Center
from esvit.losses.cross_entropy import paired_cross_entropy, teacher_probs
from esvit.losses.region import RegionLoss, match_regions, match_share
from esvit.losses.view import ViewLoss

__all__ = ["Center", "RegionLoss", "ViewLoss", "match_regions", "match_share", "paired_cross_entropy", "teacher_probs"]
