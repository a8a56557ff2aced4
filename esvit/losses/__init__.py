"""Losses: pure modules that take tensors and the current temperature."""

from esvit.losses.center import Center
from esvit.losses.region import RegionLoss, match_regions
from esvit.losses.view import ViewLoss, student_log_probs, teacher_probs

__all__ = ["Center", "RegionLoss", "ViewLoss", "match_regions", "student_log_probs", "teacher_probs"]
