"""Transform-pipeline inspection: what may run before the loader's crop."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.v2 as V  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset  # noqa: E402

from patchdp_opacus.plugin.loader import CropDPDataLoader  # noqa: E402
from patchdp_opacus.plugin.transforms import (  # noqa: E402
    DENY,
    GLOBAL_STATS,
    NEIGHBOURHOOD,
    PADDING,
    RULES,
    TransformNotAllowedError,
    inspect_dataset,
    inspect_pipeline,
)

BOX = dict(height=4, width=4)

#: One instance of every class the tables refuse, per library (built with minimal arguments).
DENIED = {
    "torchvision": [
        lambda m: m.RandomCrop(4), lambda m: m.RandomResizedCrop(4), lambda m: m.FiveCrop(4),
        lambda m: m.TenCrop(4), lambda m: m.RandomRotation(10), lambda m: m.RandomAffine(10),
        lambda m: m.RandomPerspective(), lambda m: m.ElasticTransform(),
        lambda m: m.AutoAugment(), lambda m: m.RandAugment(), lambda m: m.TrivialAugmentWide(),
        lambda m: m.AugMix(), lambda m: m.RandomEqualize(), lambda m: m.RandomAutocontrast(),
        lambda m: m.LinearTransformation(torch.eye(3), torch.zeros(3)),
    ],
    "torchvision.v2": [
        lambda m: m.RandomIoUCrop(), lambda m: m.RandomZoomOut(), lambda m: m.RandomResize(4, 8),
        lambda m: m.RandomShortestSize(4), lambda m: m.ScaleJitter((8, 8)),
        lambda m: m.MixUp(num_classes=3), lambda m: m.CutMix(num_classes=3),
    ],
    "albumentations": [
        lambda: A.RandomCrop(**BOX), lambda: A.RandomCropFromBorders(),
        lambda: A.CropAndPad(px=2), lambda: A.RandomResizedCrop(size=(4, 4)),
        lambda: A.RandomSizedCrop(min_max_height=(2, 4), size=(4, 4)),
        lambda: A.CropNonEmptyMaskIfExists(**BOX), lambda: A.BBoxSafeRandomCrop(),
        lambda: A.RandomSizedBBoxSafeCrop(**BOX), lambda: A.RandomCropNearBBox(),
        lambda: A.AtLeastOneBBoxRandomCrop(**BOX), lambda: A.RandomScale(),
        lambda: A.Affine(), lambda: A.ShiftScaleRotate(), lambda: A.Rotate(),
        lambda: A.SafeRotate(), lambda: A.Perspective(), lambda: A.ElasticTransform(),
        lambda: A.GridDistortion(), lambda: A.OpticalDistortion(), lambda: A.PiecewiseAffine(),
        lambda: A.ThinPlateSpline(), lambda: A.GridElasticDeform(num_grid_xy=(2, 2), magnitude=1),
        lambda: A.RandomGridShuffle(), lambda: A.ChromaticAberration(), lambda: A.Mosaic(),
        lambda: A.OverlayElements(), lambda: A.FDA(), lambda: A.HistogramMatching(),
        lambda: A.PixelDistributionAdaptation(), lambda: A.Equalize(), lambda: A.AutoContrast(),
        lambda: A.CLAHE(), lambda: A.FancyPCA(),
    ],
}


def denied_instances():
    out = []
    for make in DENIED["torchvision"]:
        out += [make(T), make(V)]
    out += [make(V) for make in DENIED["torchvision.v2"]]
    out += [make() for make in DENIED["albumentations"]]
    return out


def _id(t):
    return f"{type(t).__module__.split('.')[0]}.{type(t).__name__}"


@pytest.mark.parametrize("transform", denied_instances(), ids=_id)
def test_each_denied_transform_raises_with_its_reason(transform):
    lib = "albumentations" if type(transform).__module__.startswith("albumentations") \
        else "torchvision"
    rule = RULES[lib][type(transform).__name__]
    assert rule.verdict == DENY
    with pytest.raises(TransformNotAllowedError) as err:
        inspect_pipeline(transform)
    assert rule.reason in str(err.value) and type(transform).__name__ in str(err.value)
    assert err.value.verdict == DENY
    with pytest.raises(TransformNotAllowedError):  # the override does not cover refusals
        inspect_pipeline(transform, allow_unchecked=True)


def test_every_denied_table_entry_is_tested():
    tested = {(("albumentations" if type(t).__module__.startswith("albumentations")
                else "torchvision"), type(t).__name__) for t in denied_instances()}
    table = {(lib, name) for lib, rules in RULES.items() for name, r in rules.items()
             if r.verdict == DENY}
    assert table == tested


def test_allowed_pipelines_pass():
    tv1 = T.Compose([T.Resize((20, 30)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                     T.ColorJitter(0.2, 0.2), T.RandomGrayscale(), T.ToTensor(),
                     T.Normalize([0.5] * 3, [0.2] * 3), T.Pad(2),
                     T.RandomApply([T.ColorJitter(0.1)], p=0.3)])
    tv2 = V.Compose([V.ToImage(), V.ToDtype(torch.float32, scale=True), V.RandomHorizontalFlip(),
                     V.GaussianNoise(), V.RandomChoice([V.RandomInvert(), V.RandomSolarize(0.5)]),
                     V.Resize((20, 30)), V.CenterCrop(16), V.Pad(1, padding_mode="constant")])
    alb = A.Compose([
        A.HorizontalFlip(), A.VerticalFlip(),
        A.OneOf([A.RandomBrightnessContrast(), A.HueSaturationValue(), A.RGBShift()]),
        A.SomeOf([A.GaussNoise(), A.ToGray(), A.RandomGamma()], n=2),
        A.Sequential([A.ColorJitter(), A.Solarize()]), A.Resize(20, 30),
        A.PadIfNeeded(32, 32, border_mode=cv2.BORDER_CONSTANT, fill_mask=255),
        A.Normalize(), ToTensorV2()])
    for pipeline in (tv1, tv2, alb, torch.nn.Sequential(V.RandomHorizontalFlip(), V.ToImage())):
        report = inspect_pipeline(pipeline)
        assert report.unchecked == [] and report.checked
    names = inspect_pipeline(alb).checked
    assert "albumentations.augmentations.pixel.transforms.GaussNoise" in names
    assert "albumentations.pytorch.transforms.ToTensorV2" in names


@pytest.mark.parametrize("transform", [
    T.Pad(2, padding_mode="reflect"), V.Pad(2, padding_mode="edge"),
    V.Pad(2, padding_mode="symmetric"),
    A.PadIfNeeded(8, 8, border_mode=cv2.BORDER_REFLECT_101),
    A.Pad(2, border_mode=cv2.BORDER_REPLICATE),
    A.CenterCrop(8, 8, pad_if_needed=True, border_mode=cv2.BORDER_WRAP),
], ids=_id)
def test_non_constant_padding_refused(transform):
    with pytest.raises(TransformNotAllowedError, match="non-constant padding") as err:
        inspect_pipeline(transform, allow_unchecked=True)
    assert PADDING in str(err.value)


def test_image_statistics_normalize_refused():
    with pytest.raises(TransformNotAllowedError) as err:
        inspect_pipeline(A.Normalize(normalization="image"))
    assert GLOBAL_STATS in str(err.value)


def test_nested_refusal_names_its_path():
    pipeline = A.Compose([A.HorizontalFlip(), A.OneOf([A.ToGray(), A.RandomCrop(4, 4)])])
    with pytest.raises(TransformNotAllowedError, match=r"transform\.transforms\[1\]"
                                                       r"\.transforms\[1\]: .*RandomCrop"):
        inspect_pipeline(pipeline)
    with pytest.raises(TransformNotAllowedError, match="RandomRotation"):
        inspect_pipeline(T.Compose([T.RandomApply([T.RandomRotation(5)])]))


class MyFlip(T.RandomHorizontalFlip):
    """A user subclass: matched by class name *and* module, so it counts as unknown."""


def my_lambda(x):
    return x


@pytest.mark.parametrize("transform,name", [
    (MyFlip(), "test_transform_inspection.MyFlip"),
    (my_lambda, "test_transform_inspection.my_lambda"),
    (T.Lambda(my_lambda), "torchvision.transforms.transforms.Lambda"),
    (V.GaussianBlur(3), "torchvision.transforms.v2._misc.GaussianBlur"),
    (A.MotionBlur(), "albumentations.augmentations.blur.transforms.MotionBlur"),
])
def test_unknown_or_review_needs_override_and_is_reported(transform, name):
    pipeline = T.Compose([T.RandomHorizontalFlip(), transform])
    with pytest.raises(TransformNotAllowedError, match="allow_unchecked_transforms=True"):
        inspect_pipeline(pipeline)
    report = inspect_pipeline(pipeline, allow_unchecked=True)
    assert report.unchecked == [name]
    assert report.checked == ["torchvision.transforms.transforms.RandomHorizontalFlip"]


def test_neighbourhood_reason_is_given():
    with pytest.raises(TransformNotAllowedError) as err:
        inspect_pipeline(A.GaussianBlur())
    assert NEIGHBOURHOOD in str(err.value) and err.value.verdict == "review"


class ToyDataset(Dataset):
    def __init__(self, transform=None, target_transform=None, n=4):
        self.transform, self.target_transform, self.n = transform, target_transform, n
        self.image_sizes = [(6, 6)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.zeros(3, 6, 6)
        return (self.transform(x) if self.transform else x), 0


def test_dataset_attributes_subset_and_concat():
    ok = ToyDataset(V.RandomHorizontalFlip())
    assert inspect_dataset(ok).checked
    with pytest.raises(TransformNotAllowedError, match=r"dataset\.dataset\.transform"):
        inspect_dataset(Subset(ToyDataset(V.RandomCrop(4)), [0, 1]))
    with pytest.raises(TransformNotAllowedError, match=r"dataset\.target_transform"):
        inspect_dataset(ToyDataset(None, V.RandomRotation(3)))
    with pytest.raises(TransformNotAllowedError, match=r"datasets\[1\]\.transform"):
        inspect_dataset(ConcatDataset([ok, ToyDataset(A.Rotate())]))


def test_torchvision_vision_dataset_transforms_attribute():
    from torchvision.datasets import FakeData

    ds = FakeData(size=2, image_size=(3, 6, 6), transform=V.RandomHorizontalFlip(),
                  target_transform=my_lambda)
    report = inspect_dataset(ds, allow_unchecked=True)  # ds.transforms wraps both
    assert report.unchecked == ["test_transform_inspection.my_lambda"]
    with pytest.raises(TransformNotAllowedError):
        inspect_dataset(FakeData(size=2, image_size=(3, 6, 6), transform=T.RandomCrop(4)))


def test_loader_runs_inspection_and_records_unchecked():
    refused = DataLoader(ToyDataset(T.RandomResizedCrop(4)), batch_size=2)
    with pytest.raises(TransformNotAllowedError, match="RandomResizedCrop"):
        CropDPDataLoader.from_data_loader(refused, crop=4, private_region=1)
    unknown = DataLoader(ToyDataset(T.Compose([MyFlip(), T.GaussianBlur(3)])), batch_size=2)
    with pytest.raises(TransformNotAllowedError, match="MyFlip"):
        CropDPDataLoader.from_data_loader(unknown, crop=4, private_region=1)
    dp = CropDPDataLoader.from_data_loader(unknown, crop=4, private_region=1, seed=0,
                                           allow_unchecked_transforms=True)
    expected = ("test_transform_inspection.MyFlip",
                "torchvision.transforms.transforms.GaussianBlur")
    assert dp.spec.unchecked_transforms == expected == dp.unchecked_transforms
    assert dp.spec.to_dict()["unchecked_transforms"] == list(expected)
    x, _ = next(iter(dp))
    assert x.shape == (2, 3, 4, 4)
