"""Small models and data sets shared by the plugin tests (CPU, seconds)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class TinySegData(Dataset):
    """Deterministic images (3, H, W) float and masks (H, W) int64 with 3 classes."""

    def __init__(self, n=24, size=(20, 28), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, *size, generator=g)
        self.masks = (self.images[:, 0] * 3).long().clamp(max=2)
        self.image_sizes = {tuple(size)}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]


class TinySegNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return self.head(self.body(x))


def per_image_ce(reduction="mean"):
    from patchdp_opacus.segmentation.losses import PerImageCrossEntropy

    return PerImageCrossEntropy(reduction=reduction)


def plain_loader(n=24, batch_size=6, size=(20, 28)):
    return DataLoader(TinySegData(n, size), batch_size=batch_size)
