"""`patchdp train` / `evaluate` / `plot` on tiny synthetic data: resume, reports, bad data."""

import json
import math

import pytest
import torch
import yaml

from patchdp_opacus.cli import main

TINY = {
    "name": "tiny",
    "dataset": {"name": "synthetic", "root": None,
                "train": {"num_samples": 24, "image_size": [32, 64], "seed": 3,
                          "max_private_patch": [4, 4]},
                "val": {"num_samples": 2, "image_size": [32, 64], "seed": 3,
                        "max_private_patch": [4, 4]}},
    "model": {"arch": "deeplabv3plus", "encoder_name": "resnet18", "encoder_weights": None,
              "num_classes": 19, "output_stride": 16, "norm": "group", "aspp_rates": [2, 4, 6],
              "extra": {"encoder_depth": 3, "decoder_channels": 48}},
    "privacy": {"accounting": "patch", "epsilon": 6.0, "crop": [24, 24],
                "private_region": {"shape": "rectangle", "size": [4, 4]}, "max_grad_norm": 1.0},
    "training": {"epochs": 2, "batch_size": 8, "max_physical_batch_size": 4, "lr": 0.1,
                 "eval_every": 1, "eval_batch_size": 2, "device": "cpu", "seed": 5},
}


def write_cfg(tmp_path, cfg=TINY, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def read(run, name):
    return json.loads((run / name).read_text())


def test_train_resume_evaluate_and_plot(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--config", cfg, "--output", str(full), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "patch level" in out and "record level" in out and "mIoU" in out
    # interrupted after the first epoch (3 logical steps), then resumed
    assert main(["train", "--config", cfg, "--output", str(part), "--quiet",
                 "--max-steps", "3"]) == 0
    assert read(part, "final_metrics.json")["steps"] == 3
    assert main(["train", "--config", cfg, "--output", str(part), "--quiet"]) == 0
    a, b = read(full, "final_metrics.json"), read(part, "final_metrics.json")
    assert a["steps"] == b["steps"] == 2 * 3
    assert a["epsilon_patch"] == b["epsilon_patch"] and a["epsilon_record"] == b["epsilon_record"]
    assert a["epsilon_patch"] <= 6.0 < a["epsilon_record"]
    wa = torch.load(full / "checkpoint.pt", weights_only=False)["module_state_dict"]
    wb = torch.load(part / "checkpoint.pt", weights_only=False)["module_state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same batches, crops and noise

    rep = read(full, "privacy_report.json")
    assert rep["steps"] == 6 and rep["batch_size"] == 8 and rep["dataset_size"] == 24
    assert rep["geometry"]["crop"]["crop_size"] == [24, 24]
    assert rep["noise_multiplier"] == a["noise_multiplier"]
    assert "epsilon (patch level)" in (full / "privacy_report.txt").read_text()
    assert (full / "prediction.png").stat().st_size > 0
    assert (full / "metrics.csv").read_text().count("\n") == 3

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(full / "checkpoint.pt"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["miou"] == pytest.approx(a["miou"]) and len(ev["iou"]) == 19

    # a record-level run of the same config, then the Fig. 5 plot over both
    rec = tmp_path / "rec"
    assert main(["train", "--config", cfg, "--output", str(rec), "--quiet", "--accounting",
                 "record", "--max-steps", "3"]) == 0
    r = read(rec, "final_metrics.json")
    assert r["accounting"] == "record" and r["noise_multiplier"] > a["noise_multiplier"]
    capsys.readouterr()
    assert main(["plot", str(full), str(rec), "--out", str(tmp_path / "fig.png"), "--json"]) == 0
    pts = json.loads(capsys.readouterr().out)
    assert {p["accounting"] for p in pts} == {"patch", "record"}
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_budget_stop_when_resumed_with_more_epochs(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--output", str(run), "--quiet", "--epochs", "1"]) == 0
    # resuming with a longer plan recalibrates less noise; the spent budget stops it cleanly
    assert main(["train", "--config", cfg, "--output", str(run), "--quiet", "--epochs", "6"]) == 0
    final = read(run, "final_metrics.json")
    assert final["stopped"] and "budget" in final["stopped"]
    assert final["epsilon_patch"] <= 6.0
    assert final["steps"] < 6 * 3


def test_bad_inputs_exit_2_with_message(tmp_path, capsys):
    cfg = dict(TINY, dataset={"name": "cityscapes", "root": str(tmp_path / "nowhere"),
                              "train": {}, "val": {}})
    assert main(["train", "--config", write_cfg(tmp_path, cfg, "cs.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = dict(TINY, training={**TINY["training"], "learning_rate": 1})
    assert main(["train", "--config", write_cfg(tmp_path, bad, "bad.yaml")]) == 2
    assert "learning_rate" in capsys.readouterr().err
    big_crop = dict(TINY, privacy={**TINY["privacy"], "crop": [40, 40]})
    assert main(["train", "--config", write_cfg(tmp_path, big_crop, "crop.yaml"),
                 "--quiet"]) == 2
    assert "crop" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "f.png")]) == 2


def test_torchrun_two_processes_gives_the_same_accounting(tmp_path):
    """`torchrun --nproc_per_node=2 -m patchdp_opacus.cli train` (gloo on CPU): the global batch
    is split across ranks, accounting matches the single-process run of the same config."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = write_cfg(tmp_path)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", "--config", cfg, "--output", str(single), "--quiet",
                 "--max-steps", "3"]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m",
                           "patchdp_opacus.cli", "train", "--config", cfg, "--output", str(multi),
                           "--quiet", "--max-steps", "3"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read(single, "final_metrics.json"), read(multi, "final_metrics.json")
    assert b["steps"] == a["steps"] == 3
    assert b["noise_multiplier"] == a["noise_multiplier"]
    assert b["epsilon_patch"] == a["epsilon_patch"]
    assert read(multi, "privacy_report.json")["batch_size"] == 8


def test_train_in_ghost_mode(tmp_path):
    """grad_sample_mode='ghost': Opacus' wrapped criterion calls the per-image loss with
    reduction='none' (shape (B,)) and the run is accounted like hooks mode."""
    cfg = dict(TINY, training={**TINY["training"], "grad_sample_mode": "ghost"})
    run = tmp_path / "ghost"
    assert main(["train", "--config", write_cfg(tmp_path, cfg, "ghost.yaml"), "--output",
                 str(run), "--quiet", "--max-steps", "3"]) == 0
    final = read(run, "final_metrics.json")
    assert final["steps"] == 3 and final["epsilon_patch"] < final["epsilon_record"]
    assert math.isfinite(final["miou"])


def test_torchrun_demo_config_trains_with_bk(tmp_path):
    """The shipped demo (grad_sample_mode: bk) under `torchrun --nproc_per_node=2` (gloo on CPU,
    two logical steps) runs with the distributed bk optimizer, one accountant step per global
    step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert yaml.safe_load(open(demo))["training"]["grad_sample_mode"] == "bk"
    run = tmp_path / "multi"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m",
                           "patchdp_opacus.cli", "train", "--config", demo, "--output", str(run),
                           "--quiet", "--max-steps", "2", "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = read(run, "final_metrics.json")
    assert final["steps"] == 2 and final["stopped"].startswith("stopped after max_steps=2")
    assert 0 < final["epsilon_patch"] < final["epsilon_record"]
    assert math.isfinite(final["miou"])
    report = read(run, "privacy_report.json")
    assert report["batch_size"] == 128 and report["history"][-1][2] == 2
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["training"]["grad_sample_mode"] == "bk"
