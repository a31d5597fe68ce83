"""Transform-pipeline inspection: what may run before the loader's crop."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.v2 as V  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset  # noqa: E402

from patchdp_opacus.plugin.loader import CropDPDataLoader  # noqa: E402
from patchdp_opacus.plugin.transforms import (  # noqa: E402
    ALLOW,
    DENY,
    GLOBAL_STATS,
    NEIGHBOURHOOD,
    PADDING,
    RULES,
    TransformNotAllowedError,
    inspect_collate,
    inspect_dataset,
    inspect_pipeline,
    rule_for,
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
        lambda: A.CLAHE(), lambda: A.FancyPCA(), lambda: A.ISONoise(),
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
    tv1 = T.Compose([T.Resize((20, 30), interpolation=T.InterpolationMode.NEAREST),
                     T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                     T.ColorJitter(0.2, saturation=0.2, hue=0.1), T.RandomGrayscale(),
                     T.ToTensor(), T.Normalize([0.5] * 3, [0.2] * 3), T.Pad(2),
                     T.RandomApply([T.ColorJitter(0.1)], p=0.3)])
    tv2 = V.Compose([V.ToImage(), V.ToDtype(torch.float32, scale=True), V.RandomHorizontalFlip(),
                     V.GaussianNoise(), V.RandomChoice([V.RandomInvert(), V.RandomSolarize(0.5)]),
                     V.Resize((20, 30), interpolation=V.InterpolationMode.NEAREST_EXACT),
                     V.CenterCrop(16), V.Pad(1, padding_mode="constant"),
                     V.RandomPhotometricDistort(contrast=(1, 1))])
    alb = A.Compose([
        A.HorizontalFlip(), A.VerticalFlip(),
        A.OneOf([A.RandomBrightnessContrast(), A.HueSaturationValue(), A.RGBShift()]),
        A.SomeOf([A.GaussNoise(), A.ToGray(), A.RandomGamma()], n=2),
        A.Sequential([A.ColorJitter(contrast=0), A.Solarize()]),
        A.Resize(20, 30, interpolation=cv2.INTER_NEAREST),
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
    with pytest.raises(TransformNotAllowedError,
                       match=r"allow_unchecked_transforms=\['\w+'\] \(or True\)"):
        inspect_pipeline(pipeline)
    for override in (True, [name], [name.rsplit(".", 1)[-1]]):
        report = inspect_pipeline(pipeline, allow_unchecked=override)
        assert report.unchecked == [name]
        assert report.checked == ["torchvision.transforms.transforms.RandomHorizontalFlip"]
    with pytest.raises(TransformNotAllowedError):  # naming another item does not accept it
        inspect_pipeline(pipeline, allow_unchecked=["SomethingElse"])


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


# --- every allowed row, checked on a neighbour pair ------------------------------------------
#: One instance of every class the tables allow (torchvision v1 and v2, albumentations), with
#: every random branch switched on, and how it moves pixels: "pixel" (not at all), "flip" or
#: "geometry" (deterministic: the region's image is found by pushing an indicator through it).
ALLOWED = {
    "torchvision": [
        (lambda m: m.Normalize([0.5] * 3, [0.2] * 3), "pixel"),
        (lambda m: m.ColorJitter(0.5, saturation=0.5, hue=0.2), "pixel"),
        (lambda m: m.Grayscale(3), "pixel"), (lambda m: m.RandomGrayscale(1.0), "pixel"),
        (lambda m: m.RandomInvert(1.0), "pixel"), (lambda m: m.RandomPosterize(2, 1.0), "pixel"),
        (lambda m: m.RandomSolarize(0.5, 1.0), "pixel"),
        (lambda m: m.RandomErasing(1.0, value="random"), "pixel"),
        (lambda m: m.ConvertImageDtype(torch.float64), "pixel"),
        (lambda m: m.RandomHorizontalFlip(1.0), "flip"),
        (lambda m: m.RandomVerticalFlip(1.0), "flip"),
        (lambda m: m.Resize((40, 50), interpolation=m.InterpolationMode.NEAREST), "geometry"),
        (lambda m: m.CenterCrop((20, 30)), "geometry"), (lambda m: m.Pad(3), "geometry"),
    ],
    "torchvision.v1": [(lambda m: m.ToTensor(), "pixel"), (lambda m: m.PILToTensor(), "pixel"),
                       (lambda m: m.ToPILImage(), "pixel")],
    "torchvision.v2": [
        (lambda m: m.ToImage(), "pixel"), (lambda m: m.ToDtype(torch.float32), "pixel"),
        (lambda m: m.ToPureTensor(), "pixel"), (lambda m: m.RGB(), "pixel"),
        (lambda m: m.Identity(), "pixel"), (lambda m: m.RandomChannelPermutation(), "pixel"),
        (lambda m: m.RandomPhotometricDistort(contrast=(1, 1), p=1.0), "pixel"),
        (lambda m: m.GaussianNoise(), "pixel"),
    ],
    "albumentations": [
        (lambda: A.ToFloat(), "pixel"), (lambda: A.FromFloat(), "pixel"),
        (lambda: A.NoOp(), "pixel"), (lambda: A.Normalize(), "pixel"),
        (lambda: A.RandomBrightnessContrast(p=1), "pixel"),
        (lambda: A.ColorJitter(contrast=0, p=1), "pixel"),
        (lambda: A.HueSaturationValue(p=1), "pixel"), (lambda: A.RGBShift(p=1), "pixel"),
        (lambda: A.ChannelShuffle(p=1), "pixel"), (lambda: A.ChannelDropout(p=1), "pixel"),
        (lambda: A.ToGray(p=1), "pixel"), (lambda: A.ToRGB(p=1), "pixel"),
        (lambda: A.ToSepia(p=1), "pixel"), (lambda: A.InvertImg(p=1), "pixel"),
        (lambda: A.Solarize(p=1), "pixel"), (lambda: A.Posterize(p=1), "pixel"),
        (lambda: A.RandomGamma(p=1), "pixel"), (lambda: A.RandomToneCurve(p=1), "pixel"),
        (lambda: A.PlanckianJitter(p=1), "pixel"), (lambda: A.GaussNoise(p=1), "pixel"),
        (lambda: A.MultiplicativeNoise(p=1), "pixel"), (lambda: A.SaltAndPepper(p=1), "pixel"),
        (lambda: A.AdditiveNoise(p=1), "pixel"), (lambda: A.PixelDropout(p=1), "pixel"),
        (lambda: A.CoarseDropout(p=1), "pixel"), (lambda: A.Erasing(p=1), "pixel"),
        (lambda: A.GridDropout(p=1), "pixel"),
        (lambda: A.XYMasking(num_masks_x=2, mask_x_length=5, p=1), "pixel"),
        (lambda: ToTensorV2(), "pixel"),
        (lambda: A.HorizontalFlip(p=1), "flip"), (lambda: A.VerticalFlip(p=1), "flip"),
        (lambda: A.Resize(40, 50, interpolation=cv2.INTER_NEAREST), "geometry"),
        (lambda: A.LongestMaxSize(100, interpolation=cv2.INTER_NEAREST), "geometry"),
        (lambda: A.SmallestMaxSize(30, interpolation=cv2.INTER_NEAREST), "geometry"),
        (lambda: A.PadIfNeeded(70, 90, border_mode=cv2.BORDER_CONSTANT), "geometry"),
        (lambda: A.Pad(3, border_mode=cv2.BORDER_CONSTANT), "geometry"),
        (lambda: A.CenterCrop(20, 30), "geometry"), (lambda: A.Crop(5, 5, 40, 30), "geometry"),
    ],
}

H, W = 48, 64
PATCH = (slice(16, 32), slice(24, 40))


def allowed_instances():
    out = []
    for make, kind in ALLOWED["torchvision"]:
        out += [(make(T), kind), (make(V), kind)]
    out += [(make(T), kind) for make, kind in ALLOWED["torchvision.v1"]]
    out += [(make(V), kind) for make, kind in ALLOWED["torchvision.v2"]]
    out += [(make(), kind) for make, kind in ALLOWED["albumentations"]]
    return out


def _run(t, image: np.ndarray, seed: int) -> np.ndarray:
    """Apply ``t`` to an H x W x 3 uint8 image with all RNGs seeded; H x W x C array back."""
    import random

    from PIL import Image

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if type(t).__module__.startswith("albumentations"):
        out = A.Compose([t], seed=seed)(image=image)["image"]
        out = out.permute(1, 2, 0) if isinstance(out, torch.Tensor) else out
        return np.asarray(out).reshape(out.shape[0], out.shape[1], -1)
    name = type(t).__name__
    if name in ("ToTensor", "PILToTensor"):
        x = Image.fromarray(image)
    else:
        x = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        if name in ("Normalize", "GaussianNoise"):
            x = x.float() / 255
    out = t(x)
    if isinstance(out, Image.Image):
        out = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)
    return out.permute(1, 2, 0).numpy()


def _region_image(t, kind) -> np.ndarray:
    """Where the patch lands in ``t``'s output (boolean H' x W')."""
    marker = np.zeros((H, W, 3), np.uint8)
    marker[PATCH] = 255
    if kind == "pixel":
        return marker[..., 0] > 0
    if kind == "flip":
        return (marker[..., 0] > 0) | (marker[::-1, ::-1, 0] > 0) | (marker[::-1, :, 0] > 0) \
            | (marker[:, ::-1, 0] > 0)
    out = _run(t, marker, 0)
    return out.reshape(out.shape[0], out.shape[1], -1).astype(np.float64).max(-1) > 0


@pytest.mark.parametrize("transform,kind", allowed_instances(), ids=lambda v: _id(v)
                         if not isinstance(v, str) else v)
def test_each_allowed_transform_keeps_pixels_outside_the_region(transform, kind):
    """Neighbour pair: two images that differ only in the patch, the same random draws: every
    output pixel outside the patch's image is identical (the property the analysis needs)."""
    assert rule_for(transform).verdict == ALLOW
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    b = a.copy()
    b[PATCH] = (a[PATCH].astype(np.int64) + 97) % 256
    region = _region_image(transform, kind)
    for seed in range(3):
        oa, ob = _run(transform, a, seed), _run(transform, b, seed)
        assert oa.shape == ob.shape and oa.shape[:2] == region.shape
        differs = (oa != ob).any(-1)
        assert not (differs & ~region).any(), f"{differs[~region].sum()} pixels outside differ"
        if kind == "pixel" and type(transform).__name__ not in (
                "RandomErasing", "CoarseDropout", "Erasing", "GridDropout", "XYMasking",
                "ChannelDropout", "PixelDropout", "SaltAndPepper"):
            assert differs.any()  # the check sees the patch (it is not all erased)


def test_every_allowed_table_entry_is_tested():
    tested = {(("albumentations" if type(t).__module__.startswith("albumentations")
                else "torchvision"), type(t).__name__) for t, _ in allowed_instances()}
    table = {(lib, name) for lib in ("torchvision", "albumentations")
             for name, r in RULES[lib].items() if r.verdict == ALLOW}
    assert table == tested


# --- the refusals of the hardening issue -----------------------------------------------------
@pytest.mark.parametrize("transform", [
    T.ColorJitter(contrast=0.5), V.ColorJitter(contrast=0.5), V.RandomPhotometricDistort(p=1),
    A.ColorJitter(contrast=0.5), A.RandomBrightnessContrast(brightness_by_max=False),
    A.ISONoise(), A.ToGray(method="pca"), A.ColorJitter(),
], ids=_id)
def test_whole_image_statistics_refused_and_pointed_to_post_crop(transform):
    with pytest.raises(TransformNotAllowedError) as err:
        inspect_pipeline(transform, allow_unchecked=True)
    assert err.value.verdict == DENY and GLOBAL_STATS in str(err.value)
    assert "post_crop_transform" in str(err.value)


@pytest.mark.parametrize("transform", [
    T.Resize((20, 30)), V.Resize(20, interpolation=V.InterpolationMode.BICUBIC),
    A.Resize(20, 30), A.LongestMaxSize(40), A.SmallestMaxSize(20, interpolation=cv2.INTER_AREA),
], ids=_id)
def test_interpolating_resize_refused_nearest_allowed(transform):
    with pytest.raises(TransformNotAllowedError, match="interpolating resize"):
        inspect_pipeline(transform, allow_unchecked=True)
    assert inspect_pipeline(T.Resize(20, interpolation=T.InterpolationMode.NEAREST)).checked


def test_value_dependent_noise_needs_review():
    with pytest.raises(TransformNotAllowedError, match="post_crop_transform") as err:
        inspect_pipeline(A.ShotNoise())
    assert err.value.verdict == "review"


class AugmentedDataset(Dataset):
    """Transforms under other attribute names (``augment``, ``joint_transform``)."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)
        self.image_sizes = [(6, 6)]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(3, 6, 6), 0


class Wrapper(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


class Holder:
    def __init__(self, inner):
        self.inner = inner


@pytest.mark.parametrize("dataset,where", [
    (AugmentedDataset(augment=T.RandomRotation(45)), r"dataset\.augment"),
    (AugmentedDataset(joint_transform=A.Compose([A.Affine()])), r"dataset\.joint_transform"),
    (AugmentedDataset(steps=[V.RandomHorizontalFlip(), V.RandomResizedCrop(4)]),
     r"dataset\.steps\[1\]"),
    (AugmentedDataset(config={"aug": V.RandomAffine(5)}), r"dataset\.config\['aug'\]"),
    (Wrapper(ToyDataset(V.RandomRotation(3))), r"dataset\.base\.transform"),
    (AugmentedDataset(holder=Holder(T.RandomPerspective())), r"dataset\.holder\.inner"),
], ids=["augment", "joint_transform", "list", "dict", "wrapper", "holder"])
def test_transforms_under_any_attribute_are_found(dataset, where):
    with pytest.raises(TransformNotAllowedError, match=where) as err:
        inspect_dataset(dataset, allow_unchecked=True)
    assert err.value.verdict == DENY


def test_unknown_callables_anywhere_need_the_override():
    ds = AugmentedDataset(mystery=my_lambda, data=[1, 2.0, "x"], table=np.zeros(3))
    with pytest.raises(TransformNotAllowedError, match=r"dataset\.mystery: .*my_lambda"):
        inspect_dataset(ds)
    assert inspect_dataset(ds, allow_unchecked=["my_lambda"]).unchecked == [
        "test_transform_inspection.my_lambda"]
    # a data-loading function of torchvision and plain data pass
    from torchvision.datasets.folder import default_loader

    assert inspect_dataset(AugmentedDataset(loader=default_loader, rng=np.random.default_rng(),
                                            gen=torch.Generator())).unchecked == []


def test_custom_collate_refused_default_allowed():
    from torch.utils.data import default_collate

    def mix(batch):
        return default_collate(batch)

    assert inspect_collate(None).unchecked == [] and inspect_collate(default_collate).checked
    with pytest.raises(TransformNotAllowedError, match="collate_fn: .*mix"):
        inspect_collate(mix)
    assert inspect_collate(mix, allow_unchecked=["mix"]).unchecked
    with pytest.raises(TransformNotAllowedError, match="several images"):
        inspect_collate(V.MixUp(num_classes=3), allow_unchecked=True)


def test_constructor_path_runs_the_inspection():
    """Finding 3: a loader built with its constructor inspects too (and records overrides)."""
    from patchdp_opacus.privacy import PatchPrivacySpec

    spec = PatchPrivacySpec(4, 1, [(6, 6)])
    with pytest.raises(TransformNotAllowedError, match="RandomRotation"):
        CropDPDataLoader(ToyDataset(V.RandomRotation(3)), batch_size=2, spec=spec, seed=0)
    with pytest.raises(TransformNotAllowedError, match="collate_fn"):
        CropDPDataLoader(ToyDataset(), batch_size=2, spec=spec, seed=0, collate_fn=my_lambda)
    dp = CropDPDataLoader(ToyDataset(T.GaussianBlur(3)), batch_size=2, spec=spec, seed=0,
                          allow_unchecked_transforms=True)
    assert dp.spec.unchecked_transforms == ("torchvision.transforms.transforms.GaussianBlur",)


#: Reasons that point to a loader-owned transform, and the transform they name.
LOADER_OWNED = {"SCALE_CROP": "RandomResizedCrop", "RANDOM_SCALE": "RandomScaleCrop",
                "INTERPOLATING_RESIZE": "Resize"}


def _advice(message: str) -> str:
    import re

    found = re.search(r"crop=(patchdp_opacus\.privacy\.\w+\((?:[^()]|\([^()]*\))*\))", message)
    assert found, f"no loader-owned transform named in: {message}"
    return found.group(1)


def test_scale_and_resize_refusals_point_to_runnable_loader_owned_transforms():
    """Every row (and the interpolating-resize attribute rule) whose reason is a scale crop, a
    random rescaling or an interpolating resize names the loader-owned replacement, as code
    that builds it."""
    import patchdp_opacus
    from patchdp_opacus.plugin import transforms as tables
    from patchdp_opacus.privacy import geometric

    reasons = {getattr(tables, name): cls for name, cls in LOADER_OWNED.items()}
    rows = {(lib, name) for lib, rules in RULES.items() for name, r in rules.items()
            if r.reason in reasons}
    assert rows >= {("torchvision", "RandomResizedCrop"), ("torchvision", "RandomResize"),
                    ("torchvision", "ScaleJitter"), ("torchvision", "RandomShortestSize"),
                    ("albumentations", "RandomResizedCrop"), ("albumentations", "RandomScale"),
                    ("albumentations", "RandomSizedCrop")}
    pointed = 0
    for transform in denied_instances() + [T.Resize((20, 30)), A.Resize(20, 30),
                                           A.LongestMaxSize(40)]:
        rule = rule_for(transform)
        if rule.reason.split(" (interpolation=")[0] not in reasons:
            continue
        with pytest.raises(TransformNotAllowedError) as err:
            inspect_pipeline(transform)
        code = _advice(str(err.value))
        built = eval(code, {"patchdp_opacus": patchdp_opacus, "crop_size": (8, 8),
                            "size": (8, 8), "h": 8, "w": 8})
        expected = reasons[rule.reason.split(" (interpolation=")[0]]
        assert type(built) is getattr(geometric, expected), code
        pointed += 1
    assert pointed >= len(rows) + 3


class _Rotator:
    def __init__(self):
        self.rotate = T.RandomRotation(45)

    def apply(self, image):
        return self.rotate(image)


def _closure(rotate=T.RandomRotation(45)):
    return lambda image: rotate(image)


def _default(image, rotate=T.RandomRotation(45)):
    return rotate(image)


@pytest.mark.parametrize("transform", [_closure(), _default, _Rotator().apply],
                         ids=["closure", "default-argument", "bound-method"])
def test_a_refused_transform_is_found_inside_functions_even_when_they_are_allowed(transform):
    """allow_unchecked=True accepts the unknown callable itself, not the known transforms it
    holds in a closure, a default argument or the object of a bound method (the module it
    closes over, numpy here, is not walked)."""
    with pytest.raises(TransformNotAllowedError, match="RandomRotation"):
        inspect_pipeline(transform, allow_unchecked=True)


def test_a_module_held_by_a_closure_is_code_not_data():
    def flipper():
        import numpy as module

        return lambda image: module.flip(image, -1)

    report = inspect_pipeline(flipper(), allow_unchecked=True)
    assert report.unchecked and not report.checked
