"""The run folder's files (segmentation/outputs.py): strict JSON, metrics rows, TensorBoard as
an optional extra, the report's noise multipliers per history segment, the prediction grid."""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from patchdp_opacus.segmentation import outputs
from patchdp_opacus.segmentation.outputs import LOSS_COLUMN, RunOutputs


def strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_json_is_strict_and_plain():
    value = {"nan": math.nan, "inf": -math.inf, "np": np.float32(0.5), "t": torch.tensor(3),
             "tuple": (1, 2), "nested": [{"x": math.nan}], 7: "key"}
    assert strict(outputs.dumps(value)) == {"nan": None, "inf": None, "np": 0.5, "t": 3,
                                            "tuple": [1, 2], "nested": [{"x": None}],
                                            "7": "key"}


def test_iou_by_class_and_table():
    iou = outputs.iou_by_class([0.5, math.nan, 0.25], ["road", "wall", "car"])
    assert iou == {"road": 0.5, "wall": None, "car": 0.25}
    lines = outputs.iou_table(iou).splitlines()
    assert lines[1].split() == ["road", "0.5000"] and lines[2].split() == ["car", "0.2500"]
    assert lines[3].startswith("  wall") and "absent" in lines[3]


def test_history_segments_name_every_z_with_its_steps():
    segments = outputs.history_segments([(1.5, 0.1, 30), (1.2, 0.1, 15)])
    assert [(s["first_step"], s["last_step"], s["noise_multiplier"]) for s in segments] == [
        (1, 30, 1.5), (31, 45, 1.2)]
    assert outputs.used_noise_multiplier(segments) is None
    assert outputs.used_noise_multiplier(segments[:1]) == 1.5
    assert outputs.segments_text(segments) == "z = 1.5 (steps 1-30), z = 1.2 (steps 31-45)"
    report = outputs.run_report(
        {"history": [(1.5, 0.1, 30), (1.2, 0.1, 15)], "noise_multiplier": 0.9,
         "target": {"epsilon": 8, "delta": 1e-5, "steps": 90, "level": "patch",
                    "noise_multiplier": 0.9}},
        config_name="x", accounting="patch", stopped=None, model_changes={}, device="cpu",
        reproducible_noise=False, reproducible_sampling=True, secure_sampling=False,
        log_train_loss=False)
    assert report["noise_multiplier"] is None and "noise_multiplier" not in report["target"]
    text = "\n".join(outputs.report_lines(report))
    assert "steps 1-30: z = 1.5 " in text and "steps 31-45: z = 1.2 " in text
    assert "0.9" not in text  # calibrated for this invocation, never used
    assert "sampling: batches and crops reproducible from the seed" in text
    assert "noise: drawn from OS entropy" in text


def test_folder_and_config_appear_with_the_first_result(tmp_path):
    from patchdp_opacus.segmentation.config import config_from_dict

    run = RunOutputs(tmp_path / "run")
    run.write_config(config_from_dict({}), ["--set training.lr=0.1"])
    assert not (tmp_path / "run").exists()  # a run failing now leaves nothing behind
    run.add_epoch({"epoch": 1, "steps": 1, "lr": 0.1})
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.startswith("# config of this run") and "--set training.lr=0.1" in text


def test_metrics_rows_refuse_the_loss_unless_opted_in(tmp_path):
    row = {"epoch": 1, "steps": 3, "lr": 0.1, "epsilon_patch": 1.0, "epsilon_record": 2.0,
           "miou": None, LOSS_COLUMN: 0.7}
    with pytest.raises(ValueError, match="log_train_loss"):
        RunOutputs(tmp_path / "a").add_epoch(row)
    assert not (tmp_path / "a").exists()  # nothing written, no folder
    run = RunOutputs(tmp_path / "b", log_train_loss=True)
    run.add_epoch(row)
    with open(tmp_path / "b" / "metrics.csv") as f:
        (read,) = list(csv.DictReader(f))
    assert read["miou"] == "" and read[LOSS_COLUMN] == "0.7"
    # rows restored from an old checkpoint lose their loss unless this run logs it
    fresh = RunOutputs(tmp_path / "c")
    assert fresh.restore([{"epoch": 1, "train_loss": 1.0, LOSS_COLUMN: 1.0,
                           "elapsed_seconds": 4.5}]) == 4.5
    assert fresh.rows == [{"epoch": 1, "elapsed_seconds": 4.5}]


class _FakeWriter:
    instances: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.mark.parametrize("log_loss", [False, True])
def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch, log_loss):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.instances.clear()
    run = RunOutputs(tmp_path, log_train_loss=log_loss)
    row = {"epoch": 1, "steps": 5, "lr": 0.1, "epsilon_patch": 1.5, "epsilon_record": 3.0,
           "miou": 0.4, "pixel_accuracy": 0.8}
    run.add_epoch({**row, LOSS_COLUMN: 0.9} if log_loss else row)
    run.add_epoch({**row, "epoch": 2, "steps": 10, "miou": None})
    run.close()
    (writer,) = _FakeWriter.instances  # one writer for the run
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"epsilon/patch_level", "epsilon/record_level", "eval/mIoU", "train/lr"} <= tags
    assert ("eval/mIoU", 0.4, 5) in writer.scalars and ("train/lr", 0.1, 10) in writer.scalars
    assert not any(tag == "eval/mIoU" and step == 10 for tag, _, step in writer.scalars)
    loss_tags = {t for t in tags if "loss" in t}
    assert loss_tags == ({f"train/{LOSS_COLUMN}"} if log_loss else set())


def test_without_tensorboard_only_the_csv(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run = RunOutputs(tmp_path)
    run.add_epoch({"epoch": 1, "steps": 1, "lr": 0.1})
    assert (tmp_path / "metrics.csv").exists() and not (tmp_path / "tensorboard").exists()


def test_prediction_figure(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for _ in range(3):
        gt = rng.integers(0, 3, size=(20, 40))
        gt[0, :5] = 255
        samples.append((rng.integers(0, 255, size=(20, 40, 3), dtype=np.uint8), gt,
                        rng.integers(0, 4, size=(20, 40))))
    path = tmp_path / "p.png"
    outputs.save_prediction_figure(samples, ["road", "sidewalk", "building", "wall", "fence"],
                                   path)
    with Image.open(path) as im:
        w, h = im.size
    assert w > 3 * 300 and h > w / 2  # three panels per row, one row per sample
    assert outputs.palette(25).shape == (25, 3)
    assert len({tuple(c) for c in outputs.palette(25)}) == 25
