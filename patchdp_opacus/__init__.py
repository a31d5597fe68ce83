"""patchdp-opacus: patch-level differential privacy for segmentation, amplified by random crops.

``patchdp_opacus.privacy`` is the pure privacy layer (no torch).  The Opacus plugin
(``PrivacyEngine``, the accountant and the crop-aware loader) is imported lazily so that the
privacy layer and the ``patchdp epsilon`` CLI work without importing torch.  The loader-owned
transforms (``RandomScaleCrop``, ``RandomResizedCrop``, ``Resize``; ``crop=`` of
``make_private``) are re-exported from the privacy layer.
"""

import importlib
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

_LAZY = {
    "PrivacyEngine": "patchdp_opacus.plugin.engine",
    "PatchPLDAccountant": "patchdp_opacus.plugin.accountant",
    "CropDPDataLoader": "patchdp_opacus.plugin.loader",
    "RandomScaleCrop": "patchdp_opacus.privacy.geometric",
    "RandomResizedCrop": "patchdp_opacus.privacy.geometric",
    "Resize": "patchdp_opacus.privacy.geometric",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchdp_opacus' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
