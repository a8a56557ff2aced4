#!/usr/bin/env python
"""EsViT pretraining. Same as the ``esvit-train`` console script.

    python train_ssl.py --config configs/debug_cpu.yaml
    torchrun --nproc_per_node=2 train_ssl.py --config configs/cifar10_resnet18.yaml data.path=...
"""

import sys

from esvit.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
