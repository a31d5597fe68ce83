#!/usr/bin/env python
"""Write the paper's DTD copy: images with a side < 300 px dropped, the rest resized to 300x300.

    python scripts/preprocess_dtd.py data/dtd-raw data/dtd-300

SRC is the unpacked official archive (the folder holding images/ and labels/, or torchvision's
<root>/dtd/dtd). DST receives images/<class>/*.png (lossless), labels/{train,val,test}<k>.txt
without the dropped images, and preprocessing.json. The classification configs read DST.
The privacy guarantee then protects regions measured in pixels of the resized 300x300 images.
"""

from __future__ import annotations

import argparse
import logging
import sys

from patchdp_opacus.classification.datasets.dtd import preprocess_dtd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", help="raw DTD folder (images/ and labels/)")
    p.add_argument("destination", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--size", type=int, nargs=2, default=[300, 300], metavar=("H", "W"),
                   help="output size in pixels (default: 300 300)")
    p.add_argument("--min-side", type=int, default=300,
                   help="drop images whose shorter side is below this (default: 300)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = preprocess_dtd(args.source, args.destination, size=tuple(args.size),
                                  min_side=args.min_side, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"preprocess_dtd: error: {exc}", file=sys.stderr)
        return 2
    print(f"kept {manifest['kept']} images, dropped {len(manifest['dropped'])} "
          f"(side < {args.min_side}): {', '.join(sorted(manifest['dropped'])) or 'none'}")
    for name, c in manifest["label_files"].items():
        if name.endswith("1.txt"):
            print(f"  {name}: {c['kept']} of {c['listed']}")
    print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
