#!/usr/bin/env python
"""One command per figure of the paper: privacy-only figures are computed and written as PNG +
CSV; training figures print the grid they need.

    python scripts/reproduce.py fig2                # Fig. 2 -> outputs/reproduce/fig2.{png,csv}
    python scripts/reproduce.py privacy --out figs  # every privacy-only figure
    python scripts/reproduce.py fig13               # what DTD's Fig. 13 needs (data, GPU hours)
"""

import sys

from patchdp_opacus.reproduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
