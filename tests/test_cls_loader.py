"""The classification datasets plug into the crop-aware loader as they are: ``(image, label)``
samples, ``image_sizes`` declared, the crop applied by the loader (no training here: that is the
phase-B integration of issue 14)."""

from __future__ import annotations

from fractions import Fraction

import torch

from patchdp_opacus.classification import DTD, MNIST, preprocess_dtd
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.privacy import CropGeometry, PatchPrivacySpec
from test_cls_datasets import make_dtd, make_mnist


def _one_batch(dataset, crop, region):
    spec = PatchPrivacySpec(CropGeometry(crop), region, dataset.image_sizes)
    loader = CropDPDataLoader(dataset, batch_size=2, spec=spec, seed=0)
    return loader, next(iter(loader))


def test_mnist_batches_are_loader_cropped(tmp_path):
    make_mnist(tmp_path)
    ds = MNIST(tmp_path, "train", val_size=10)
    loader, (images, labels) = _one_batch(ds, 10, 1)
    assert images.shape == (2, 1, 10, 10) and images.dtype == torch.uint8
    assert set(labels.tolist()) <= set(ds.labels)
    assert loader.spec.inclusion.fraction == Fraction(10 * 10, 19 * 19)  # 1x1 patch, 19 origins


def test_preprocessed_dtd_batches_are_loader_cropped(tmp_path):
    make_dtd(tmp_path / "raw")
    preprocess_dtd(tmp_path / "raw", tmp_path / "dtd300")
    ds = DTD(tmp_path / "dtd300", "train")
    loader, (images, labels) = _one_batch(ds, 100, 5)
    assert images.shape == (2, 3, 100, 100) and set(labels.tolist()) <= {0, 2}
    assert loader.image_sizes == ((300, 300),)
