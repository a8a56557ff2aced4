"""Data layer: workers decode images to a fixed ``uint8`` canvas; augmentation happens later.

Every dataset yields ``(image, label int, SampleStatus(ok, index, error))`` (see
:mod:`esvit.data.folder`): the image is a ``uint8 (3, S, S)`` square, or for training
(``resize_mode="letterbox"``) a :class:`Canvas`: the whole image letterboxed into the square,
with its box and original size, so that crops are drawn over the whole photo.
:class:`BadImageCounter` does the run-wide bad-file accounting in the main process, and
:func:`build_loader` gives a loader whose order is a pure function of ``(seed, epoch)``.
"""

from esvit.data.datasets import (
    DATASET_KINDS,
    ArrayImageDataset,
    EpochDataLoader,
    EpochSampler,
    build_dataset,
    build_loader,
    worker_init_fn,
)
from esvit.data.decode import (
    RESIZE_MODES,
    BadImageError,
    Canvas,
    load_canvas,
    load_image,
    resize_to_canvas,
    to_canvas,
    to_rgb,
)
from esvit.data.folder import (
    IMG_EXTENSIONS,
    BadImageCounter,
    ImageFolderDataset,
    PathTable,
    SampleStatus,
    read_image_list,
    scan_image_folder,
)
from esvit.data.synthetic import (
    SyntheticImageDataset,
    render_synthetic_image,
    write_synthetic_image_folder,
)

__all__ = [
    "DATASET_KINDS",
    "IMG_EXTENSIONS",
    "RESIZE_MODES",
    "ArrayImageDataset",
    "BadImageCounter",
    "BadImageError",
    "Canvas",
    "EpochDataLoader",
    "EpochSampler",
    "ImageFolderDataset",
    "PathTable",
    "SampleStatus",
    "SyntheticImageDataset",
    "build_dataset",
    "build_loader",
    "load_canvas",
    "load_image",
    "read_image_list",
    "render_synthetic_image",
    "resize_to_canvas",
    "scan_image_folder",
    "to_canvas",
    "to_rgb",
    "worker_init_fn",
    "write_synthetic_image_folder",
]
