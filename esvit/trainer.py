"""EsViTTrainer: multi-crop augmentation on the training device, student, EMA teacher, losses."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from esvit.augment import MultiCropAugmentation, ViewParams
from esvit.backbones import build_backbone, drop_path_kwargs
from esvit.data.decode import Canvas
from esvit.losses import RegionLoss, ViewLoss
from esvit.losses.cross_entropy import softmax_entropy
from esvit.metrics import entropy_and_kl, global_view_matching, token_similarity
from esvit.model import EsViTModel, ModelOutput
from esvit.train.distributed import convert_sync_batchnorm, is_sync_batchnorm
from esvit.wrapper import NetWrapper

NUM_GLOBAL_VIEWS = 2
#: The collapse metrics look at this many teacher tokens / images per step (a subset keeps them
#: cheap with 65536 outputs and hundreds of tokens per image).
METRIC_ROWS = 4096
METRIC_IMAGES = 32


class EsViTTrainer(nn.Module):
    """Student + EMA teacher + per-sample multi-crop augmentation + view and region losses.

    The teacher starts as an exact copy of the student, never receives gradients and is
    updated only by :meth:`update_teacher`. It is deterministic
    (:meth:`EsViTModel.make_deterministic`): no dropout or stochastic depth, whatever the
    student's, as the official teacher is built with drop-path 0; its BatchNorm layers (if any)
    use batch statistics in train mode, as there. The teacher sees the two global views; the student
    sees all views (2 global + ``n_local`` local), with one backbone call per crop resolution.

    Args:
        net: Any backbone ``nn.Module``.
        layer: Name (or index in ``named_modules()``) of the layer whose output is hooked.
        layout: Layout of that output: ``"bchw"``, ``"bhwc"`` or ``"bnd"``.
        pool: ``"avg"`` or ``"cls"`` pooling of the hooked output.
        num_prefix_tokens: Leading non-region tokens (CLS) for ``"bnd"`` layouts.
        global_size: Side of the global crops.
        local_size: Side of the local crops.
        n_local: Number of local crops (0 allowed).
        global_scale: Area range of global crops.
        local_scale: Area range of local crops.
        out_dim: Output dimension ``K`` of both heads.
        hidden_dim: Head MLP hidden width.
        bottleneck_dim: Head bottleneck width.
        use_bn_in_head: BatchNorm in the head MLP.
        norm_last_layer: Fix the weight-norm magnitude of the heads' last layer to 1.
        student_temp: Student temperature.
        center_momentum: EMA momentum of the view and region centres.
        region_loss: Also train the region-level task (EsViT); False gives plain DINO.
        region_out_dim: Output dimension of the region head (None: ``out_dim``).
        use_bn_in_region_head: BatchNorm in the region head. Off by default whatever
            ``use_bn_in_head`` says (the official code has one flag for both heads, off in its
            recipes): BatchNorm over region tokens lets the backbone's tokens collapse
            (``docs/region.md``).
        region_weight: ``w`` in ``loss = (1 - w) * view + w * region`` (official 0.5); a
            schedule can pass another value per step to :meth:`forward`.
        augment: A custom augmentation module (``uint8 (b,3,H,W) -> list of views``); built
            from the crop arguments when None.
        augment_options: Further :class:`MultiCropAugmentation` arguments (``blur_p``,
            ``blur_sigma``, ``solarize_p``, ...), used when ``augment`` is None.
        seed: Seed of the augmentation's random generator.
        channels_last: Run convolutional backbones in NHWC memory format (faster with
            oneDNN/cuDNN). None: on when the backbone has more than one ``Conv2d``
            (CNNs), off for ViTs whose only convolution is the patch embedding.
    """

    def __init__(
        self,
        net: nn.Module,
        layer: str | int,
        layout: str,
        *,
        pool: str = "avg",
        num_prefix_tokens: int = 0,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        region_loss: bool = True,
        region_out_dim: int | None = None,
        use_bn_in_region_head: bool = False,
        region_weight: float = 0.5,
        augment: nn.Module | None = None,
        augment_options: dict | None = None,
        seed: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        if local_size > global_size:
            raise ValueError(f"local_size ({local_size}) must not exceed global_size ({global_size})")
        if not 0.0 <= region_weight <= 1.0:
            raise ValueError(f"region_weight must be in [0, 1], got {region_weight}")
        self.augment = augment or MultiCropAugmentation(
            global_size=global_size, local_size=local_size, n_local=n_local,
            global_scale=global_scale, local_scale=local_scale, seed=seed, **(augment_options or {}),
        )
        wrapper = NetWrapper(net, layer, layout, pool=pool, num_prefix_tokens=num_prefix_tokens)
        if channels_last is None:
            channels_last = sum(isinstance(m, nn.Conv2d) for m in net.modules()) > 1
        self.student = EsViTModel.build(
            wrapper, global_size, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
            use_bn=use_bn_in_head, norm_last_layer=norm_last_layer, region=region_loss,
            channels_last=channels_last, region_out_dim=region_out_dim, region_use_bn=use_bn_in_region_head,
        )
        self.teacher = copy.deepcopy(self.student).make_deterministic()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.view_loss = ViewLoss(out_dim, student_temp, center_momentum)
        self.region_out_dim = region_out_dim or out_dim
        self.region_loss = RegionLoss(self.region_out_dim, student_temp, center_momentum) if region_loss else None
        self.region_weight = region_weight
        self.out_dim = out_dim
        self._student_forward: nn.Module | None = None
        self.shard: tuple[int, int] | None = None

    @classmethod
    def from_backbone(
        cls, name: str, backbone_kwargs: dict | None = None, *, drop_path_rate: float | None = None, **kwargs
    ) -> EsViTTrainer:
        """Build a trainer around a registered backbone (see :func:`esvit.backbones.build_backbone`).

        Args:
            name: Registry name.
            backbone_kwargs: Factory options.
            drop_path_rate: The student's stochastic depth (None: the factory's default). A rate
                > 0 for a backbone without stochastic depth raises ``ValueError``
                (:func:`esvit.backbones.drop_path_kwargs`). The teacher never drops paths.
            **kwargs: Constructor arguments of :class:`EsViTTrainer`.
        """
        net, spec = build_backbone(name, **drop_path_kwargs(name, backbone_kwargs, drop_path_rate))
        return cls(net, spec.layer, spec.layout, pool=spec.pool, num_prefix_tokens=spec.num_prefix_tokens, **kwargs)

    # ------------------------------------------------------------------ batch norm
    def has_batchnorm(self) -> bool:
        """True when the student (backbone or heads) has a BatchNorm layer."""
        return any(isinstance(m, _BatchNorm) for m in self.student.modules())

    def convert_sync_batchnorm(self, process_group: object | None = None) -> int:
        """Convert the BatchNorm layers of student and teacher to synchronised BatchNorm.

        Call before wrapping the student in DDP, as the official ``main_esvit.py`` does. On
        CUDA this is ``torch.nn.SyncBatchNorm``; on CPU (gloo), where torch's refuses to run,
        :class:`esvit.train.distributed.CPUSyncBatchNorm`. Parameters and buffers are kept (same
        objects), so state dict keys, the optimiser's parameters and the EMA pairing are unchanged.

        Args:
            process_group: Group to synchronise over (None: the default group).

        Returns:
            The number of BatchNorm layers converted in the student.
        """
        n = sum(isinstance(m, _BatchNorm) and not is_sync_batchnorm(m) for m in self.student.modules())
        self.student = convert_sync_batchnorm(self.student, process_group)
        self.teacher = convert_sync_batchnorm(self.teacher, process_group)
        return n

    # ------------------------------------------------------------------ distributed
    def set_shard(self, rank: int, world_size: int) -> None:
        """Declare that each batch is rank ``rank``'s contiguous block of a global batch.

        Augmentation parameters are then drawn for the global batch and sliced, so every sample
        gets the same views whatever the number of ranks (see :class:`EpochBlockSampler`).
        """
        self.shard = (rank, world_size) if world_size > 1 else None

    def set_student_forward(self, module: nn.Module | None) -> None:
        """Route student forwards through ``module`` (e.g. ``DDP(trainer.student)``).

        The module is stored without registering it, so state dicts keep their plain keys.
        """
        object.__setattr__(self, "_student_forward", module)

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> list[dict]:
        """Student parameter groups for the optimiser: no weight decay on biases and norms.

        Returns:
            ``[{"params": decayed, "apply_wd": True}, {"params": others, "apply_wd": False,
            "weight_decay": 0.0}]``; the loop sets the scheduled weight decay on the first.
        """
        decay, no_decay = [], []
        for _, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay, "apply_wd": True},
            {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
        ]

    def last_layer_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the heads' last (weight-normalised) layers: while the last layer is frozen,
        :func:`esvit.train.optim.clip_gradients` drops their gradients before clipping."""
        for name, p in self.student.named_parameters():
            if "last_layer" in name:
                yield p

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA update ``teacher = m * teacher + (1 - m) * student`` with fused foreach ops."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
        t_params = list(self.teacher.parameters())
        s_params = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    # ------------------------------------------------------------------ forward
    def _check_images(self, images: Tensor | Canvas) -> None:
        if isinstance(images, Canvas):
            images = images.image
        if not isinstance(images, Tensor):
            raise TypeError(f"EsViTTrainer expects a uint8 tensor (b, 3, H, W), got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(
                f"EsViTTrainer expects raw uint8 images (b, 3, H, W) in [0, 255]; got dtype {images.dtype}. "
                "Augmentation and normalisation happen inside the trainer."
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"EsViTTrainer expects images of shape (b, 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] < 1:
            raise ValueError("EsViTTrainer got an empty batch")

    def forward(self, images: Tensor | Canvas, teacher_temp: float, region_weight: float | None = None
                ) -> dict[str, Tensor]:
        """Augment a batch, run student and teacher, and compute the losses.

        Args:
            images: uint8 images ``(b, 3, H, W)``, on any device (moved to the model's), or a
                letterboxed :class:`~esvit.data.decode.Canvas` batch (the training loader's
                items): crops are then drawn over each whole original image.
            teacher_temp: Current teacher temperature.
            region_weight: This step's region weight ``w`` (None: the constructor's); the loss is
                ``(1 - w) * view_loss + w * region_loss``.

        Returns:
            Dict with ``loss`` (differentiable) and detached metrics: ``view_loss``,
            ``region_loss``, ``teacher_entropy`` (mean per-sample entropy of the teacher's
            view distribution, nats), ``teacher_kl_uniform`` (KL of the batch-mean teacher
            distribution to uniform: near ``log K`` when one dimension dominates),
            ``student_entropy`` (on the global views); with the region loss also
            ``region_teacher_entropy``, ``region_teacher_kl_uniform``, ``region_match_share``
            and ``region_match_accuracy`` (:func:`esvit.metrics.global_view_matching`);
            ``token_similarity`` (:func:`esvit.metrics.token_similarity` of the teacher's
            tokens of the first global view).
        """
        self._check_images(images)
        device = next(self.student.parameters()).device
        images = images.to(device, non_blocking=device.type == "cuda")
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            if isinstance(self.augment, MultiCropAugmentation):
                views, params = self.augment.forward_with_params(images, self.shard)
                if not self.augment.exact_geometry:  # an extra op moved pixels: boxes are not the geometry
                    params = None
            else:  # a custom augmentation: no crop geometry for region_match_accuracy
                if isinstance(images, Canvas):
                    images = images.image
                views = self.augment(images, shard=self.shard) if self.shard else self.augment(images)
                params = None
        n_t = NUM_GLOBAL_VIEWS
        with torch.no_grad():
            t_out: ModelOutput = self.teacher(views[:n_t])
        student = self._student_forward or self.student
        s_out: ModelOutput = student(views)

        # the stacked / flat head outputs: no split-and-concatenate copies forward or backward
        view_loss = self.view_loss(s_out["view_stack"], t_out["view_stack"], teacher_temp)
        if self.region_loss is not None:
            region_loss = self.region_loss(
                s_out["region_flat"], s_out["region_feat"], t_out["region_flat"], t_out["region_feat"], teacher_temp
            )
            w = self.region_weight if region_weight is None else region_weight
            loss = (1.0 - w) * view_loss + w * region_loss
        else:
            region_loss = torch.zeros_like(view_loss)
            loss = view_loss
        metrics = self._collapse_metrics(s_out, t_out, teacher_temp, params)
        if self.training:
            self.view_loss.update_center(t_out["view_stack"])
            if self.region_loss is not None:
                self.region_loss.update_center(t_out["region_flat"])
        return {"loss": loss, "view_loss": view_loss.detach(), "region_loss": region_loss.detach(), **metrics}

    @torch.no_grad()
    def _collapse_metrics(self, s_out: ModelOutput, t_out: ModelOutput, teacher_temp: float,
                          params: list[ViewParams] | None) -> dict[str, Tensor]:
        """The collapse signals of both branches (:mod:`esvit.metrics`), the region ones on a
        subset of the batch: at most :data:`METRIC_ROWS` teacher tokens for the entropy, the first
        :data:`METRIC_IMAGES` images for the token similarity and the matching."""
        m = METRIC_IMAGES
        ent_t, kl_uniform = entropy_and_kl(t_out["view_stack"], teacher_temp, self.view_loss.center.center)
        # the global views suffice for a signal
        ent_s, _ = softmax_entropy(s_out["view_stack"][:NUM_GLOBAL_VIEWS], self.view_loss.student_temp)
        metrics = {"teacher_entropy": ent_t, "teacher_kl_uniform": kl_uniform, "student_entropy": ent_s.mean(),
                   "token_similarity": token_similarity(t_out["region_feat"][0][:m])}
        if self.region_loss is not None and t_out["region_flat"] is not None:
            t_rows = t_out["region_flat"]
            t_rows = t_rows[:: max(1, t_rows.shape[0] // METRIC_ROWS)]
            ent, kl = entropy_and_kl(t_rows, teacher_temp, self.region_loss.center.center)
            metrics.update(region_teacher_entropy=ent, region_teacher_kl_uniform=kl)
            metrics.update(global_view_matching([f[:m] for f in s_out["region_feat"][:NUM_GLOBAL_VIEWS]],
                                                [f[:m] for f in t_out["region_feat"]], params))
        return metrics

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        """Non-tensor-module state needed for an exact resume (augmentation RNG)."""
        return {"augment_rng": self.augment.get_rng_state()} if hasattr(self.augment, "get_rng_state") else {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""
        if "augment_rng" in state and hasattr(self.augment, "set_rng_state"):
            self.augment.set_rng_state(state["augment_rng"])
