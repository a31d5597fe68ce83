"""Cityscapes / A2D2 readers on generated folders, and the synthetic dataset."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from patchdp_opacus.segmentation.datasets import (
    A2D2,
    A2D2_SPLITS,
    DATASETS,
    Cityscapes,
    SyntheticStreetScenes,
    build_dataset,
)
from patchdp_opacus.segmentation.datasets.a2d2 import load_a2d2_groups
from patchdp_opacus.segmentation.datasets.synthetic import GLYPH_COLOUR, PLATE_COLOUR, SKIN_COLOURS

# Cityscapes labelIds -> trainIds (the 19 evaluation classes), written out independently of the
# implementation's table
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
             23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_cityscapes(root, split="train", items=(("aachen", "000000_000019", (6, 8)), ("bonn", "000001_000002", (5, 7))), rng=None):
    rng = rng or np.random.default_rng(0)
    truth = {}
    for city, frame, (h, w) in items:
        stem = f"{city}_{frame}"
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lab = (np.arange(h * w) % 34).reshape(h, w).astype(np.uint8)  # every labelId 0..33
        save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", img)
        save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
        truth[stem] = (img, lab)
    return truth


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_mapping_pixel_by_pixel(tmp_path):
    truth = make_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19
    assert ds.image_sizes == {(6, 8), (5, 7)}
    assert [ds.size_of(i) for i in range(2)] == [(6, 8), (5, 7)]  # sorted: aachen, bonn
    for i, (img, lab) in enumerate(truth.values()):
        image, mask = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, *lab.shape)
        assert mask.dtype == torch.int64 and mask.shape == lab.shape
        assert np.array_equal(image.permute(1, 2, 0).numpy(), img)
        for (y, x), lid in np.ndenumerate(lab):
            assert mask[y, x].item() == TRAIN_IDS.get(int(lid), 255), (y, x, lid)


def test_cityscapes_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="root folder does not exist: .*nowhere"):
        Cityscapes(tmp_path / "nowhere")


def test_cityscapes_missing_split_folders(tmp_path):
    make_cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"split folder does not exist: .*leftImg8bit/val"):
        Cityscapes(tmp_path, "val")
    (tmp_path / "leftImg8bit" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split folder does not exist: .*gtFine/val"):
        Cityscapes(tmp_path, "val")


def test_cityscapes_empty_split(tmp_path):
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="split 'val' is empty"):
        Cityscapes(tmp_path, "val")


def test_cityscapes_image_without_label(tmp_path):
    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine" / "train" / "bonn" / "bonn_000001_000002_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(FileNotFoundError, match="1 Cityscapes images have no label file") as err:
        Cityscapes(tmp_path)
    assert str(label) in str(err.value)


def test_cityscapes_label_out_of_range(tmp_path):
    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    lab = np.zeros((6, 8), np.uint8)
    lab[2, 3] = 40
    save(label, lab)
    ds = Cityscapes(tmp_path)
    with pytest.raises(ValueError, match=r"label values out of range in .*aachen_000000_000019_gtFine_labelIds.png: \[40\]"):
        ds[0]
    ds[1]  # the other sample is fine


def test_cityscapes_label_size_mismatch(tmp_path):
    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine" / "train" / "bonn" / "bonn_000001_000002_gtFine_labelIds.png"
    save(label, np.zeros((5, 9), np.uint8))
    with pytest.raises(ValueError, match=r"label size \(5, 9\) .* differs from image size \(5, 7\)"):
        Cityscapes(tmp_path)


def test_cityscapes_colour_label_rejected(tmp_path):
    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine" / "train" / "bonn" / "bonn_000001_000002_gtFine_labelIds.png"
    save(label, np.zeros((5, 7, 3), np.uint8))
    with pytest.raises(ValueError, match="mode 'RGB'"):
        Cityscapes(tmp_path)[1]


# ---------------------------------------------------------------- A2D2

A2D2_CLASSES = {  # a subset of the official class_list.json
    "#ff0000": "Car 1", "#c80000": "Car 2", "#cc99ff": "Pedestrian 1", "#ff00ff": "RD normal street",
    "#b496c8": "Sidewalk", "#87ceff": "Sky", "#f1e6ff": "Buildings", "#60458f": "Blurred area",
    "#48d1cc": "Ego car", "#8000ff": "Dashed line", "#93fdc2": "Nature object", "#1e1c9e": "Traffic signal 2",
}
ALL_A2D2_NAMES = [
    "Car 1", "Car 2", "Car 3", "Car 4", "Bicycle 1", "Bicycle 2", "Bicycle 3", "Bicycle 4",
    "Pedestrian 1", "Pedestrian 2", "Pedestrian 3", "Truck 1", "Truck 2", "Truck 3",
    "Small vehicles 1", "Small vehicles 2", "Small vehicles 3", "Traffic signal 1", "Traffic signal 2",
    "Traffic signal 3", "Traffic sign 1", "Traffic sign 2", "Traffic sign 3", "Utility vehicle 1",
    "Utility vehicle 2", "Sidebars", "Speed bumper", "Curbstone", "Solid line", "Irrelevant signs",
    "Road blocks", "Tractor", "Non-drivable street", "Zebra crossing", "Obstacles / trash", "Poles",
    "RD restricted area", "Animals", "Grid structure", "Signal corpus", "Drivable cobblestone",
    "Electronic traffic", "Slow drive area", "Nature object", "Parking area", "Sidewalk", "Ego car",
    "Painted driv. instr.", "Traffic guide obj.", "Dashed line", "RD normal street", "Sky", "Buildings",
    "Blurred area", "Rain dirt",
]


def rgb(hex_colour):
    v = int(hex_colour[1:], 16)
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def make_a2d2(root, sessions=("20180101_000000",), size=(4, 5), per_session=2, rng=None):
    rng = rng or np.random.default_rng(1)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "class_list.json").write_text(json.dumps(A2D2_CLASSES))
    palette = [rgb(c) for c in A2D2_CLASSES] + [(1, 2, 3)]  # last: a colour not in the class list
    truth = []
    for s in sessions:
        for k in range(per_session):
            ts = f"{s.replace('_', '')}{k:02d}"
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            idx = rng.integers(0, len(palette), size)
            idx.flat[: len(palette)] = np.arange(len(palette))  # every colour appears
            lab = np.array(palette, dtype=np.uint8)[idx]
            save(root / s / "camera" / "cam_front_center" / f"{ts}_camera_frontcenter_{k:09d}.png", img)
            save(root / s / "label" / "cam_front_center" / f"{ts}_label_frontcenter_{k:09d}.png", lab)
            truth.append((img, lab))
    return truth


def test_a2d2_groups_file():
    spec = load_a2d2_groups()
    groups = spec["groups"]
    assert len(groups) == 18 == len(set(groups))
    ignored = {n.lower() for n in spec["ignore"]}
    assert {"blurred area", "ego car", "rain dirt"} == ignored
    bases = {k.lower() for k in spec["classes"]}
    for name in ALL_A2D2_NAMES:  # every official class is grouped or explicitly ignored
        base = name.rsplit(" ", 1)[0] if name[-1].isdigit() else name
        assert base.lower() in bases or base.lower() in ignored, name
    assert set(spec["classes"].values()) == set(groups)  # no empty group


def test_a2d2_mapping_pixel_by_pixel(tmp_path):
    sessions = ("20180101_000000", "20180202_111111")
    truth = make_a2d2(tmp_path, sessions)
    ds = A2D2(tmp_path, sessions=sessions)
    groups = list(ds.class_names)
    assert len(ds) == 4 and ds.num_classes == 18 and ds.image_sizes == {(4, 5)}
    expected_group = {
        "Car 1": "car", "Car 2": "car", "Pedestrian 1": "person", "RD normal street": "road",
        "Sidewalk": "sidewalk", "Sky": "sky", "Buildings": "building", "Dashed line": "lane marking",
        "Nature object": "vegetation", "Traffic signal 2": "traffic light",
    }
    colour_to_id = {rgb(c): (groups.index(expected_group[n]) if n in expected_group else 255) for c, n in A2D2_CLASSES.items()}
    for i, (img, lab) in enumerate(truth):
        image, mask = ds[i]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), img)
        assert mask.dtype == torch.int64
        for y in range(lab.shape[0]):
            for x in range(lab.shape[1]):
                want = colour_to_id.get(tuple(int(v) for v in lab[y, x]), 255)  # unknown colour -> 255
                assert mask[y, x].item() == want, (y, x, lab[y, x])


def test_a2d2_paper_split_and_errors(tmp_path):
    make_a2d2(tmp_path, A2D2_SPLITS["val"], per_session=1)
    ds = build_dataset("a2d2", tmp_path, "val")
    assert len(ds) == 3 and ds.sessions == A2D2_SPLITS["val"]
    with pytest.raises(FileNotFoundError, match=r"session folder does not exist: .*20181107_132730"):
        A2D2(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown A2D2 split"):
        A2D2(tmp_path, "holdout")
    with pytest.raises(FileNotFoundError, match="root folder does not exist"):
        A2D2(tmp_path / "missing", "val")


def test_a2d2_bad_files(tmp_path):
    s = "20180101_000000"
    make_a2d2(tmp_path, (s,))
    labels = sorted((tmp_path / s / "label" / "cam_front_center").glob("*.png"))
    labels[0].unlink()
    with pytest.raises(FileNotFoundError, match="1 A2D2 images have no label file") as err:
        A2D2(tmp_path, sessions=(s,))
    assert str(labels[0]) in str(err.value)
    save(labels[0], np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=r"label size \(4, 6\) .* differs from image size \(4, 5\)"):
        A2D2(tmp_path, sessions=(s,))
    save(labels[0], np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="expected a colour-coded RGB PNG"):
        A2D2(tmp_path, sessions=(s,))[0]
    (tmp_path / "class_list.json").write_text(json.dumps({"red": "Car 1"}))
    with pytest.raises(ValueError, match="'red' is not a '#rrggbb' colour"):
        A2D2(tmp_path, sessions=(s,))
    (tmp_path / "class_list.json").unlink()
    with pytest.raises(FileNotFoundError, match="class list not found"):
        A2D2(tmp_path, sessions=(s,))
    empty = tmp_path / "empty"
    (empty / s / "camera" / "cam_front_center").mkdir(parents=True)
    (empty / "class_list.json").write_text(json.dumps(A2D2_CLASSES))
    with pytest.raises(FileNotFoundError, match="no \\*_camera_frontcenter_\\*.png images"):
        A2D2(empty, sessions=(s,))


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_varied():
    a = SyntheticStreetScenes(num_samples=6, seed=3)
    b = build_dataset("synthetic", split="train", num_samples=6, seed=3)
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
        assert a.private_regions(i) == b.private_regions(i)
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticStreetScenes(num_samples=6, seed=4)[0][0])
    assert not torch.equal(a[0][0], SyntheticStreetScenes(split="val", num_samples=6, seed=3)[0][0])
    # lazily generated: index order does not matter
    assert torch.equal(SyntheticStreetScenes(num_samples=6, seed=3)[5][0], a[5][0])
    image, mask = a[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 256)
    assert mask.dtype == torch.int64 and mask.shape == (128, 256)
    assert a.image_sizes == {(128, 256)} and a.size_of(5) == (128, 256) and len(a) == 6
    assert set(torch.unique(mask).tolist()) <= {0, 1, 2, 8, 10, 11, 13}
    with pytest.raises(IndexError):
        a[6]


@pytest.mark.parametrize("size,max_patch", [((128, 256), (10, 10)), ((96, 160), (3, 4)), ((64, 128), (6, 12))])
def test_synthetic_private_regions(size, max_patch):
    ds = SyntheticStreetScenes(num_samples=12, image_size=size, max_private_patch=max_patch, noise_std=0.0, seed=7)
    H, W = size
    special = [PLATE_COLOUR, GLYPH_COLOUR, *SKIN_COLOURS]
    n_regions = 0
    for i in range(len(ds)):
        image, mask = ds[i]
        img = image.permute(1, 2, 0).numpy().astype(int)
        regions, kinds = ds.private_regions(i), ds.private_kinds(i)
        assert "plate" in kinds and "face" in kinds
        private = ds.private_mask(i)
        for (y, x, h, w), kind in zip(regions, kinds):
            n_regions += 1
            assert 0 <= y and 0 <= x and y + h <= H and x + w <= W  # inside the image
            assert 1 <= h <= max_patch[0] and 1 <= w <= max_patch[1]
            box = img[y : y + h, x : x + w].reshape(-1, 3)
            allowed = [PLATE_COLOUR, GLYPH_COLOUR] if kind == "plate" else list(SKIN_COLOURS)
            assert all(tuple(p) in allowed for p in box), (i, kind)
            assert (box == PLATE_COLOUR if kind == "plate" else box == box[0]).all(axis=1).mean() >= 0.5
            assert (mask[y : y + h, x : x + w] == (13 if kind == "plate" else 11)).all()
        # the plate/face colours appear nowhere outside the recorded boxes
        is_special = np.zeros((H, W), bool)
        for colour in special:
            is_special |= (img == colour).all(axis=2)
        assert not (is_special & ~private).any(), i
        assert (is_special & private).sum() == private.sum()
    assert n_regions >= 2 * len(ds)


def test_synthetic_noise_keeps_layout_and_is_fast():
    clean = SyntheticStreetScenes(num_samples=4, noise_std=0.0, seed=1)
    noisy = SyntheticStreetScenes(num_samples=4, noise_std=8.0, seed=1)
    assert clean.private_regions(2) == noisy.private_regions(2)
    assert torch.equal(clean[2][1], noisy[2][1])
    diff = clean[2][0].float() - noisy[2][0].float()
    assert 4 < diff.std() < 12
    t = time.perf_counter()
    big = SyntheticStreetScenes(num_samples=50)
    for i in range(50):
        big[i]
    assert time.perf_counter() - t < 2.0


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_synthetic_is_learnable_under_dp_sgd():
    """A short DP-SGD run (z=1, C=1) of a tiny CNN beats the majority-class predictor widely."""
    from opacus import PrivacyEngine

    from patchdp_opacus.segmentation.losses import PerImageCrossEntropy
    from patchdp_opacus.segmentation.metrics import ConfusionMatrix

    torch.manual_seed(0)
    kw = dict(image_size=(32, 64), max_private_patch=(4, 4))
    train = SyntheticStreetScenes(num_samples=256, seed=0, **kw)
    test = SyntheticStreetScenes(split="val", num_samples=8, seed=0, **kw)

    def inp(x):  # scaled pixels plus a row-position channel
        rows = torch.linspace(-1, 1, 32).view(1, 1, 32, 1).expand(len(x), 1, 32, 64)
        return torch.cat([x.float() / 127.5 - 1, rows], 1)

    xs = inp(torch.stack([train[i][0] for i in range(len(train))]))
    ys = torch.stack([train[i][1] for i in range(len(train))])
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(), torch.nn.Conv2d(8, 19, 1)
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=64, shuffle=True)
    opt = torch.optim.SGD(net.parameters(), lr=2.0, momentum=0.9)
    model, opt, loader = PrivacyEngine().make_private(
        module=net, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False
    )
    loss_fn = PerImageCrossEntropy()
    for _ in range(10):  # 40 steps
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    model_cm, majority_cm = ConfusionMatrix(19), ConfusionMatrix(19)
    with torch.no_grad():
        for i in range(len(test)):
            x, y = test[i]
            model_cm.update(model(inp(x[None])), y[None])
            majority_cm.update(torch.zeros_like(y[None]), y[None])  # road is the majority class
    model_miou, majority_miou = model_cm.compute()["miou"], majority_cm.compute()["miou"]
    assert majority_miou < 0.1
    assert model_miou > 0.3, (model_miou, majority_miou)


def test_registry():
    assert {"cityscapes", "a2d2", "synthetic"} <= set(DATASETS)
    with pytest.raises(KeyError, match="unknown dataset"):
        build_dataset("kitti", "/tmp")
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("cityscapes")
