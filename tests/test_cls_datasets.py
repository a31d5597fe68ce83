"""DTD and MNIST readers on generated files: layouts, the paper's DTD preprocessing, and the
errors a user meets (each names the file and the fix)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchdp_opacus.classification.datasets import DTD, MNIST, find_dtd_folder, preprocess_dtd

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "preprocess_dtd.py"
_spec = importlib.util.spec_from_file_location("preprocess_dtd", _SCRIPT)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
preprocess_main = _module.main

# (class, file, (height, width)): one image of each class below 300 px on one side.
IMAGES = [("banded", "banded_0001.jpg", (300, 320)), ("banded", "banded_0002.jpg", (299, 500)),
          ("zigzagged", "zigzagged_0001.jpg", (310, 300)),
          ("dotted", "dotted_0001.jpg", (400, 301))]
SPLITS = {"train": ["banded/banded_0001.jpg", "banded/banded_0002.jpg",
                    "zigzagged/zigzagged_0001.jpg"],
          "val": ["dotted/dotted_0001.jpg"], "test": ["zigzagged/zigzagged_0001.jpg"]}


def _image(size, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


def make_dtd(folder, splits=SPLITS):
    for i, (cls, name, size) in enumerate(IMAGES):
        path = folder / "images" / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(size, i)).save(path, quality=95)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for split, entries in splits.items():
        (folder / "labels" / f"{split}1.txt").write_text("".join(f"{e}\n" for e in entries))
    (folder / "labels" / "labels_joint_anno.txt").write_text("banded/banded_0001.jpg banded\n")
    return folder


@pytest.fixture
def raw_dtd(tmp_path):
    return make_dtd(tmp_path / "raw" / "dtd" / "dtd")  # torchvision's download layout


def test_raw_dtd_drops_short_images_and_keeps_sizes(raw_dtd):
    ds = DTD(raw_dtd.parents[1], "train", image_size=None)
    assert ds.class_names == ("banded", "dotted", "zigzagged")
    assert ds.dropped == ["banded/banded_0002.jpg"]  # 299 px high
    assert len(ds) == 2 and ds.labels == [0, 2]
    assert [ds.size_of(i) for i in range(2)] == [(300, 320), (310, 300)]
    assert ds.image_sizes == {(300, 320), (310, 300)}
    image, label = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 310, 300) and label == 2
    decoded = np.array(Image.open(raw_dtd / "images/zigzagged/zigzagged_0001.jpg"))
    assert torch.equal(image, torch.from_numpy(decoded).permute(2, 0, 1))


def test_preprocessed_dtd_is_300x300_without_the_dropped_image(raw_dtd, tmp_path):
    out = tmp_path / "dtd300"
    manifest = preprocess_dtd(raw_dtd, out)
    assert manifest["dropped"] == {"banded/banded_0002.jpg": [299, 500]}
    assert manifest["kept"] == 3 and manifest["label_files"]["train1.txt"] == \
        {"listed": 3, "kept": 2}
    assert json.loads((out / "preprocessing.json").read_text())["size"] == [300, 300]
    assert (out / "labels/train1.txt").read_text() == \
        "banded/banded_0001.png\nzigzagged/zigzagged_0001.png\n"
    assert not (out / "labels/labels_joint_anno.txt").exists()
    ds = DTD(out, "train")
    assert len(ds) == 2 and ds.image_sizes == {(300, 300)} and ds.dropped == []
    image, label = ds[0]
    assert image.shape == (3, 300, 300) and label == 0
    with Image.open(raw_dtd / "images/banded/banded_0001.jpg") as im:  # resize pinned: bilinear
        expected = np.array(im.convert("RGB").resize((300, 300), Image.Resampling.BILINEAR))
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert [len(DTD(out, s)) for s in ("val", "test")] == [1, 1]


def test_default_path_on_raw_images_names_the_preprocessing_command(raw_dtd):
    with pytest.raises(ValueError, match=r"320.*expected 300x300: run python scripts/"
                                         r"preprocess_dtd.py"):
        DTD(raw_dtd, "train")


def test_preprocess_refuses_a_non_empty_destination(raw_dtd, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        preprocess_dtd(raw_dtd, tmp_path / "busy")


def test_preprocess_script(raw_dtd, tmp_path, capsys):
    assert preprocess_main([str(raw_dtd), str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "kept 3 images, dropped 1" in out and "train1.txt: 2 of 3" in out
    assert preprocess_main([str(tmp_path / "nowhere"), str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dtd_layout_errors_name_the_file_and_the_fix(raw_dtd, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DTD(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"images/<class>.*dtd/dtd"):
        find_dtd_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"train2.txt does not exist"):
        DTD(raw_dtd, "train", partition=2, image_size=None)
    with pytest.raises(ValueError, match="split"):
        DTD(raw_dtd, "training")


@pytest.mark.parametrize("content,error,message", [
    ("plaid/plaid_0001.jpg\n", ValueError, r"train1.txt:1: class 'plaid' has no folder"),
    ("banded_0001.jpg\n", ValueError, r"train1.txt:1: expected '<class>/<file>'"),
    ("banded/banded_0001.jpg\nbanded/banded_0001.jpg\n", ValueError, "listed twice"),
    ("banded/banded_0009.jpg\n", FileNotFoundError, r"1 images listed in .*train1.txt do not "
                                                    r"exist[\s\S]*banded_0009.jpg"),
    ("\n", ValueError, "lists no images"),
])
def test_mismatched_label_files(raw_dtd, content, error, message):
    (raw_dtd / "labels" / "train1.txt").write_text(content)
    with pytest.raises(error, match=message):
        DTD(raw_dtd, "train", image_size=None)


def test_preprocessed_label_file_pointing_at_raw_jpgs_suggests_preprocessing(raw_dtd, tmp_path):
    out = tmp_path / "dtd300"
    preprocess_dtd(raw_dtd, out)
    (out / "labels" / "val1.txt").write_text("dotted/dotted_0001.jpg\n")
    with pytest.raises(FileNotFoundError, match="preprocess_dtd.py"):
        DTD(out, "val")


# --------------------------------------------------------------------------- MNIST

def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def make_mnist(folder, n_train=30, n_test=7, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        data[prefix] = (images, labels)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            path = folder / f"{prefix}-{kind}{'.gz' if gz else ''}"
            payload = _idx(arr)
            path.write_bytes(gzip.compress(payload) if gz else payload)
    return data


@pytest.mark.parametrize("gz,sub", [(False, ""), (True, "MNIST/raw")])
def test_mnist_reads_plain_and_gzip_idx_files(tmp_path, gz, sub):
    data = make_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
    train, val = MNIST(tmp_path, "train", val_size=10), MNIST(tmp_path, "val", val_size=10)
    test = MNIST(tmp_path, "test")
    assert (len(train), len(val), len(test)) == (20, 10, 7)
    images, labels = data["train"]
    assert train.labels == labels[:20].tolist() and val.labels == labels[20:].tolist()
    image, label = val[3]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert torch.equal(image[0], torch.from_numpy(images[23])) and label == int(labels[23])
    assert train.image_sizes == {(28, 28)} and train.size_of(5) == (28, 28)
    assert test.labels == data["t10k"][1].tolist() and train.class_names[3] == "3"
    assert train.channels == 1 and train.num_classes == 10


def test_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MNIST(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte \(or .*\.gz\) not "
                                                r"found in .*MNIST/raw"):
        MNIST(tmp_path)
    make_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(29, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"holds 30 images but .*train-labels-idx1-ubyte holds "
                                         r"29 labels"):
        MNIST(tmp_path)
    labels.write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes())
    with pytest.raises(ValueError, match="swapped"):
        MNIST(tmp_path)
    labels.write_bytes(_idx(np.full(30, 12, dtype=np.uint8)))
    with pytest.raises(ValueError, match="digits 0..9, found 12"):
        MNIST(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        MNIST(tmp_path)
    images.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="not an idx file"):
        MNIST(tmp_path)
    make_mnist(tmp_path)
    with pytest.raises(ValueError, match="val_size"):
        MNIST(tmp_path, "train", val_size=30)
