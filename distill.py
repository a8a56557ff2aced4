#!/usr/bin/env python
"""Knowledge distillation into a student classifier. Same as the ``esvit-distill`` console script.

    python distill.py --config configs/distill_debug_cpu.yaml
    python distill.py --config configs/distill_cifar10.yaml --data ../shared/data/cifar10/train --val-split 500 \
        teacher.checkpoint=runs/cifar10_resnet18/checkpoint_00039000.pt
"""

import sys

from esvit.cli.distill import main

if __name__ == "__main__":
    sys.exit(main())
