"""Losses: pure modules that take tensors and the current temperature."""

from esvit.losses.center import Center
from esvit.losses.region import RegionLoss, match_regions
from esvit.losses.view import ViewLoss, cross_entropy_to_targets, student_log_probs, teacher_probs

__all__ = ["Center", "RegionLoss", "ViewLoss", "cross_entropy_to_targets", "match_regions", "student_log_probs", "teacher_probs"]
