"""One image, one record (``record_key``), validation images outside the training data, and
post-crop stages that keep no state across samples."""

import numpy as np
import pytest
import torch
from classification_data import write_dtd, write_mnist
from plugin_helpers import TinySegData
from test_seg_datasets import make_a2d2, make_cityscapes
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from patchdp_opacus.classification.datasets import DTD, MNIST
from patchdp_opacus.plugin.loader import (
    CropDPDataLoader,
    check_unique_records,
    record_key,
    shared_records,
)
from patchdp_opacus.plugin.transforms import TransformNotAllowedError
from patchdp_opacus.segmentation.augment import build_transforms
from patchdp_opacus.segmentation.datasets import A2D2, Cityscapes, SyntheticStreetScenes

CROP, REGION, SIZE = (8, 8), (1, 1), (20, 20)


# --- record keys of our data sets -----------------------------------------------------------------
def test_two_cityscapes_objects_over_one_folder_are_one_set_of_records(tmp_path):
    make_cityscapes(tmp_path)
    make_cityscapes(tmp_path, "val", items=(("lindau", "000000_000019", (6, 8)),))
    train, again, val = Cityscapes(tmp_path), Cityscapes(tmp_path), Cityscapes(tmp_path, "val")
    with pytest.raises(ValueError, match="record 0 of Cityscapes is record 0 of Cityscapes"):
        check_unique_records(ConcatDataset([train, again]))
    check_unique_records(ConcatDataset([train, val]))
    assert shared_records(train, val) == []
    assert len(shared_records(train, Subset(again, [1]))) == 1


def test_a2d2_sessions_listed_twice_share_records(tmp_path):
    sessions = ("20180101_000000", "20180202_111111")
    make_a2d2(tmp_path, sessions)
    first, both = A2D2(tmp_path, sessions=sessions[:1]), A2D2(tmp_path, sessions=sessions)
    assert len(shared_records(first, both)) == 2
    assert shared_records(first, A2D2(tmp_path, sessions=sessions[1:])) == []


def test_mnist_train_and_val_are_two_ranges_of_one_file(tmp_path):
    root = write_mnist(tmp_path / "mnist", n_train=20, n_test=4)
    train, val = MNIST(root, "train", val_size=5), MNIST(root, "val", val_size=5)
    assert shared_records(train, val) == []
    assert record_key(val, 0) == record_key(MNIST(root, "train", val_size=0), 15)
    assert record_key(MNIST(root, "test"), 0) != record_key(train, 0)


def test_dtd_partitions_of_the_same_images_share_records(tmp_path):
    root = write_dtd(tmp_path / "dtd", per_class=6, sizes=((32, 32),))
    train, val = DTD(root, "train", 1, image_size=None, min_side=32), DTD(root, "val", 1, image_size=None, min_side=32)
    assert shared_records(train, val) == []
    assert len(shared_records(train, DTD(root, "train", 1, image_size=None, min_side=32))) == 3


def test_synthetic_scenes_are_their_seed_split_and_index():
    a = SyntheticStreetScenes(num_samples=4, image_size=(32, 64), seed=0)
    assert record_key(a, 2) == record_key(SyntheticStreetScenes(num_samples=8, seed=0), 2)
    assert record_key(a, 2) != record_key(SyntheticStreetScenes(num_samples=4, seed=1), 2)
    assert record_key(a, 2) != record_key(
        SyntheticStreetScenes(split="val", num_samples=4, seed=0), 2)


def test_tensor_records_are_their_memory():
    x, y = torch.zeros(6, 3, *SIZE, dtype=torch.uint8), torch.zeros(6, *SIZE, dtype=torch.long)
    with pytest.raises(ValueError, match="TensorDataset"):   # two views of the same rows
        check_unique_records(ConcatDataset([TensorDataset(x[:4], y[:4]),
                                            TensorDataset(x[3:], y[3:])]))
    check_unique_records(ConcatDataset([TensorDataset(x[:3], y[:3]),
                                        TensorDataset(x[3:], y[3:])]))
    check_unique_records(ConcatDataset([TensorDataset(x, y), TensorDataset(x.clone(), y)]))
    # ^ a copy of the pixels is another record to any key: the README says so


def test_a_custom_data_set_is_compared_by_its_own_record_key():
    class Photos(TinySegData):
        def __init__(self, people):
            super().__init__(len(people), SIZE)
            self.people = people

        def record_key(self, index):
            return ("person", self.people[index])

    with pytest.raises(ValueError, match="record 0 of Photos is record 1 of Photos"):
        check_unique_records(ConcatDataset([Photos(["ann", "bob"]), Photos(["bob", "cy"])]))
    check_unique_records(Photos(["ann", "bob", "cy"]))


# --- post-crop stages that keep state -------------------------------------------------------------
def _iterate(post_crop_transform):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (12, 3, *SIZE), dtype=torch.uint8, generator=g),
                         torch.randint(0, 3, (12, *SIZE), generator=g))
    loader = CropDPDataLoader.from_data_loader(DataLoader(data, batch_size=4), crop=CROP,
                                               private_region=REGION, image_sizes=[SIZE],
                                               post_crop_transform=post_crop_transform)
    return sum(len(batch[0]) for batch in loader)


class _Cache:
    """Keeps the last crop in a numpy array and blends it into the next one."""

    def __init__(self):
        self.last = np.zeros((3, *CROP), dtype=np.float32)

    def __call__(self, sample):
        image, mask = sample
        out = image.float() + torch.from_numpy(self.last)
        self.last[...] = image.float().numpy()
        return out, mask


class _Counter:
    def __init__(self):
        self.history = []

    def __call__(self, sample):
        self.history.append(float(sample[0].float().mean()))
        return sample


class _OwnGenerator:
    """Random brightness from its own generator: the state advances, no pixel goes in."""

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.torch_rng = torch.Generator().manual_seed(0)

    def __call__(self, sample):
        shift = float(self.rng.uniform(-10, 10)) + float(torch.rand(1, generator=self.torch_rng))
        return sample[0].float() + shift, sample[1]


@pytest.mark.parametrize("stage", [_Cache, _Counter])
def test_post_crop_stages_that_remember_earlier_samples_are_refused(stage):
    with pytest.raises(TransformNotAllowedError, match="carr|changed the data it holds"):
        _iterate(stage())


@pytest.mark.parametrize("stage", [
    _OwnGenerator,
    lambda: build_transforms([{"A.HorizontalFlip": {}}, {"A.ColorJitter": {}},
                              {"A.GaussNoise": {}}, {"A.CLAHE": {}}]),
    lambda: build_transforms([{"tv.ColorJitter": {"contrast": 0.5}}]),
])
def test_stateless_post_crop_stages_run(stage):
    assert _iterate(stage()) == 12


class _Flipped(torch.utils.data.Dataset):
    """A custom wrapper: the same images, mirrored (its index map is unknown to the loader)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, mask = self.dataset[i]
        return image.flip(-1), mask.flip(-1)


class _FlippedWithKey(_Flipped):
    def record_key(self, i):
        return record_key(self.dataset, i)


def test_a_custom_wrapper_over_a_data_set_used_elsewhere_must_say_what_it_reads():
    data = SyntheticStreetScenes(num_samples=4, image_size=(32, 64), seed=0)
    with pytest.raises(ValueError, match="Define record_key"):
        check_unique_records(ConcatDataset([data, _Flipped(data)]))
    with pytest.raises(ValueError, match="is record 0 of SyntheticStreetScenes again"):
        check_unique_records(ConcatDataset([data, _FlippedWithKey(data)]))
    check_unique_records(_Flipped(data))   # a wrapper alone: its records are the wrapped ones
    other = SyntheticStreetScenes(num_samples=4, image_size=(32, 64), seed=1)
    check_unique_records(ConcatDataset([data, _Flipped(other)]))
