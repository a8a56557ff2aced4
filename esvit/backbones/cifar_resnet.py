"""ResNet-18 for small (32-96 px) images: 3x3 stride-1 stem conv and no max-pool.

The network *is* a torchvision ``resnet18`` with ``conv1`` and ``maxpool`` replaced, so its
state_dict has torchvision's keys; :func:`cifar_resnet18_torchvision` builds the matching plain
torchvision model for export. It has no stochastic depth (its factory takes no ``drop_path_rate``).
"""

from __future__ import annotations

from torch import nn
from torchvision import models

from .registry import BackboneSpec, register_backbone

__all__ = ["cifar_resnet18", "cifar_resnet18_torchvision"]


def cifar_resnet18_torchvision(image_size: int = 32) -> nn.Module:
    """``torchvision.models.resnet18(weights=None)`` modified for small images.

    ``conv1`` becomes ``Conv2d(3, 64, 3, stride=1, padding=1, bias=False)`` (initialised like
    torchvision's convs), ``maxpool`` and ``fc`` become ``nn.Identity``. Output stride 8.

    Args:
        image_size: Accepted for interface uniformity; no effect.

    Returns:
        The modified ResNet-18, mapping ``(b, 3, h, w)`` to ``(b, 512)``.
    """
    net = models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


@register_backbone("cifar_resnet18", equivalent=cifar_resnet18_torchvision)
def cifar_resnet18(image_size: int = 32) -> tuple[nn.Module, BackboneSpec]:
    """CIFAR-style ResNet-18; hooks ``layer4`` -> ``(b, 512, h/8, w/8)``."""
    spec = BackboneSpec(
        name="cifar_resnet18",
        layer="layer4",
        layout="bchw",
        num_prefix_tokens=0,
        pool="avg",
        embed_dim=512,
        export_ctor="torchvision.models.resnet18",
    )
    return cifar_resnet18_torchvision(image_size), spec
