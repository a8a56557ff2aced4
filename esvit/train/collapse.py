"""Collapse signals of the view and region branches, checked every step, warned about once.

DINO-style training fails in a few recognisable ways, each visible in the per-step metrics of
:class:`esvit.trainer.EsViTTrainer`:

==================  ===========================================================================
signal              meaning
==================  ===========================================================================
``view_one_dim``    teacher view entropy near 0 with a non-uniform mean: one prototype wins
``view_uniform``    teacher view entropy at ``log K`` and its mean uniform: nothing is learned
``region_one_dim``  the same two for the region head's teacher outputs
``region_uniform``
``region_match``    most tokens of a global view are matched to one token of the other global
                    view (a hub): the region task degenerates into copying that token's output
``token_collapse``  the backbone maps every token of every image to nearly one vector (mean
                    cosine similarity of tokens across the batch near 1), whatever the heads
                    still output: BatchNorm in the region head hides it from the losses
``region_trivial``  the region loss far below the view loss: the region branch solves a task
                    much easier than the view task, because the matching confirms itself (a
                    student token is matched to the teacher token whose features are most like
                    its own, so any smooth head agrees with it; ``region_match_accuracy`` stays
                    near chance) or because the matching has a hub
==================  ===========================================================================

Values are smoothed with an exponential moving average (a step's noise never warns), checked
from ``grace_steps`` on (random initialisation looks odd by these measures) and every signal
warns at most once every ``repeat_every`` steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger("esvit.train")

#: Thresholds, as fractions of ``log K`` for the entropies.
ONE_DIM_ENTROPY = 0.05
UNIFORM_ENTROPY, UNIFORM_KL = 0.98, 0.01
#: ``region_match_share`` above this: the matching has a hub.
MATCH_SHARE = 0.5
#: ``token_similarity`` above this: the backbone's tokens have collapsed.
TOKEN_SIMILARITY = 0.85
#: ``region_loss / view_loss`` (each divided by its head's ``log K``) below this: the region task
#: has become trivial (healthy runs measured 0.75-0.85; collapsing ones 0.07-0.45, docs/region.md).
TRIVIAL_RATIO = 0.5

HINTS = {
    "view_one_dim": "teacher view entropy {value:.3f} is near 0: collapse to one dimension "
                    "(raise teacher.center_momentum or lower the teacher temperature warmup)",
    "view_uniform": "teacher view entropy {value:.3f} sits at log(out_dim)={log_k:.3f}: uniform collapse "
                    "(lower teacher.temp)",
    "region_one_dim": "teacher region entropy {value:.3f} is near 0: the region head collapses to one "
                      "dimension (see docs/region.md)",
    "region_uniform": "teacher region entropy {value:.3f} sits at log(out_dim)={log_k:.3f}: the region head "
                      "learns nothing (see docs/region.md)",
    "region_match": "{value:.0%} of a view's tokens are matched to a single teacher token: region matching "
                    "has collapsed onto a hub (model.use_bn_in_region_head=false, a lower "
                    "model.region_weight or model.region_warmup_epochs help; see docs/region.md)",
    "token_collapse": "backbone tokens have a mean cosine similarity of {value:.2f} across images: the "
                      "backbone's features are collapsing (BatchNorm in the region head hides it: "
                      "model.use_bn_in_region_head=false; see docs/region.md)",
    "region_trivial": "region loss {value:.2f}x the view loss (each relative to log out_dim): the region task has become trivial (its "
                      "matching confirms itself or has a hub, see region_match_accuracy); at this token "
                      "grid plain DINO (model.region_loss=false) is likely the better use of compute, "
                      "see docs/region.md",
}


@dataclass
class CollapseMonitor:
    """Watch the per-step collapse metrics and log a warning when a signal fires.

    Args:
        out_dim: Output dimension ``K`` of the view head.
        region_out_dim: Output dimension of the region head (None: ``out_dim``).
        grace_steps: Steps before the first check.
        repeat_every: Minimum number of steps between two warnings of the same signal.
        smoothing: Weight of the newest step in the moving averages.
    """

    out_dim: int
    region_out_dim: int | None = None
    grace_steps: int = 50
    repeat_every: int = 1000
    smoothing: float = 0.1
    _avg: dict[str, float] = field(default_factory=dict)
    _last: dict[str, int] = field(default_factory=dict)

    def _smooth(self, metrics: dict[str, float]) -> dict[str, float]:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                old = self._avg.get(key)
                self._avg[key] = value if old is None else old + self.smoothing * (value - old)
        return self._avg

    def _log_k(self, branch: str) -> float:
        return math.log(self.region_out_dim or self.out_dim if branch == "region" else self.out_dim)

    def signals(self, m: dict[str, float]) -> dict[str, float]:
        """The signals that fire for (smoothed) metrics ``m``, with the value each one reports."""
        fired: dict[str, float] = {}
        for branch, prefix in (("view", "teacher"), ("region", "region_teacher")):
            log_k = self._log_k(branch)
            h, kl = m.get(f"{prefix}_entropy"), m.get(f"{prefix}_kl_uniform")
            if h is None:
                continue
            if h < ONE_DIM_ENTROPY * log_k:
                fired[f"{branch}_one_dim"] = h
            elif h > UNIFORM_ENTROPY * log_k and (kl if kl is not None else 1.0) < UNIFORM_KL * log_k:
                fired[f"{branch}_uniform"] = h
        similarity = m.get("token_similarity")
        if similarity is not None and similarity > TOKEN_SIMILARITY:
            fired["token_collapse"] = similarity
        share = m.get("region_match_share")
        if share is not None and share > MATCH_SHARE:
            fired["region_match"] = share
        view, region = m.get("view_loss"), m.get("region_loss")
        if view and region is not None and "region_teacher_entropy" in m:
            # each loss relative to its head's log K (the loss of a uniform prediction)
            ratio = (region / self._log_k("region")) / (view / self._log_k("view"))
            if ratio < TRIVIAL_RATIO:
                fired["region_trivial"] = ratio
        return fired

    def update(self, metrics: dict[str, float], step: int) -> list[str]:
        """Fold in one step's metrics; log and return the signals that warn now.

        Args:
            metrics: The trainer's metrics of this step (floats).
            step: Global step.

        Returns:
            Names of the signals warned about at this step.
        """
        smoothed = self._smooth(metrics)
        if step < self.grace_steps:
            return []
        warned = []
        for name, value in self.signals(smoothed).items():
            last = self._last.get(name)
            if last is not None and step - last < self.repeat_every:
                continue
            self._last[name] = step
            log_k = self._log_k(name.split("_")[0])
            log.warning("step %d: %s", step, HINTS[name].format(value=value, log_k=log_k))
            warned.append(name)
        return warned
