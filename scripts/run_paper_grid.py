#!/usr/bin/env python
"""Run the paper's grid: epsilon x seeds x accountings for one config, on your GPUs.

The grid runner lives in the package (:mod:`patchdp_opacus.reproduce.grid`, also used by
``patchdp reproduce FIGURE``); see its docstring or ``--help`` for the options.

    python scripts/run_paper_grid.py --config configs/cityscapes/pspnet.yaml --gpus 0 1 2 3
    python scripts/run_paper_grid.py --config configs/dtd/resnet18.yaml -- --data-root data/dtd300
    python scripts/run_paper_grid.py --config configs/cityscapes/deeplabv3plus.yaml \\
        --accounting gaussian_augmentation --sigma-aug 2550
    python scripts/run_paper_grid.py --config configs/mnist/table1_crop.yaml --accounting none
    patchdp plot runs/cityscapes_deeplabv3plus --out fig5.png
"""

import sys

from patchdp_opacus.reproduce.grid import main

if __name__ == "__main__":
    sys.exit(main())
