"""Linear evaluation of a pretrained backbone (same as the ``esvit-linear`` console script).

Example: python linear_eval.py --checkpoint runs/esvit/checkpoint_00001000.pt \
    --data ../shared/data/cifar10/train --val-split 500
"""

import sys

from esvit.cli.linear import main

if __name__ == "__main__":
    sys.exit(main())
