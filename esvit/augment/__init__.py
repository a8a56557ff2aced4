"""Batched multi-crop augmentation (DINO / EsViT recipe) and its batched functional ops."""

from esvit.augment.blur import blur_kernel_size, gaussian_blur, gaussian_kernel1d
from esvit.augment.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    rgb_to_grayscale,
    solarize,
    to_grayscale,
)
from esvit.augment.crop import (
    CropDraws,
    boxes_to_canvas,
    boxes_to_rois,
    crop_boxes_from_draws,
    draw_crop_boxes,
    resized_crop,
    sample_crop_boxes,
)
from esvit.augment.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_IMAGE_SIZE,
    MultiCropAugmentation,
    ViewParams,
)

__all__ = [
    "CropDraws",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIN_IMAGE_SIZE",
    "MultiCropAugmentation",
    "ViewParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "boxes_to_canvas",
    "boxes_to_rois",
    "color_jitter",
    "crop_boxes_from_draws",
    "draw_crop_boxes",
    "gaussian_blur",
    "gaussian_kernel1d",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
    "to_grayscale",
]
