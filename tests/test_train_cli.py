"""`patchdp train` / `evaluate` / `plot` on tiny synthetic data: resume, reports, bad data."""

import csv
import json
import math
import re

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


def strict_json(path):
    """Parse as strict JSON: NaN / Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


REPRODUCIBLE = ["--set", "privacy.reproducible_noise=true",
                "--set", "privacy.reproducible_sampling=true"]


def test_train_resume_evaluate_and_plot(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--config", cfg, "--output", str(full), "--quiet", *REPRODUCIBLE,
                 "--set", "training.lr=0.2"]) == 0
    out = capsys.readouterr().out
    assert "patch level" in out and "record level" in out and "mIoU" in out
    assert "per-class IoU" in out and "building" in out  # the table at the end
    # interrupted after the first epoch (3 logical steps), then resumed
    assert main(["train", "--config", cfg, "--output", str(part), "--quiet", *REPRODUCIBLE,
                 "--set", "training.lr=0.2", "--max-steps", "3"]) == 0
    assert read(part, "final_metrics.json")["steps"] == 3
    assert main(["train", "--config", cfg, "--output", str(part), "--quiet", *REPRODUCIBLE,
                 "--set", "training.lr=0.2"]) == 0
    a, b = strict_json(full / "final_metrics.json"), strict_json(part / "final_metrics.json")
    assert a["steps"] == b["steps"] == 2 * 3
    assert a["epsilon_patch"] == b["epsilon_patch"] and a["epsilon_record"] == b["epsilon_record"]
    assert a["epsilon_patch"] <= 6.0 < a["epsilon_record"]
    sa = torch.load(full / "checkpoint.pt", weights_only=True)
    sb = torch.load(part / "checkpoint.pt", weights_only=True)
    wa, wb = sa["module_state_dict"], sb["module_state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same batches, crops and noise
    # the noise generator is public here (reproducible_noise), and only it is stored
    assert "noise_generator_state" in sa and "torch_rng_state" not in sa

    # per-class IoU as {class name: IoU}, absent classes null (strict JSON)
    assert set(a["iou"]) >= {"road", "car", "sky"} and len(a["iou"]) == 19
    assert any(v is None for v in a["iou"].values())
    # the override is recorded in the run's config
    saved = yaml.safe_load((full / "config.yaml").read_text())
    assert saved["training"]["lr"] == 0.2 and saved["privacy"]["reproducible_noise"] is True
    assert "--set training.lr=0.2" in (full / "config.yaml").read_text()

    rep = strict_json(full / "privacy_report.json")
    assert rep["steps"] == 6 and rep["batch_size"] == 8 and rep["dataset_size"] == 24
    assert rep["geometry"]["crop"]["crop_size"] == [24, 24]
    assert rep["noise_multiplier"] == a["noise_multiplier"]
    assert "not private if the seed is known" in rep["noise_source"]
    assert "not private if the seed is known" in rep["sampling_source"]
    text = (full / "privacy_report.txt").read_text()
    assert "epsilon (patch level)" in text
    assert "for orientation only, Opacus-style epsilon" in text  # labelled as another relation
    assert "noise: reproducible from the seed — not private if the seed is known" in text
    assert "batches and crops reproducible from the seed — not private if the seed" in text
    assert (full / "prediction.png").stat().st_size > 0

    with open(full / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["steps"] for r in rows] == ["3", "6"]
    assert float(rows[0]["lr"]) == 0.2 and float(rows[1]["elapsed_seconds"]) > 0
    assert float(rows[1]["epsilon_patch"]) == a["epsilon_patch"]
    assert float(rows[1]["miou"]) == pytest.approx(a["miou"])
    assert set(rows[0]) >= {"epsilon_record", "pixel_accuracy", "epoch_seconds", "time"}
    assert not any("loss" in k for k in rows[0])

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(full / "checkpoint.pt"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert ev["miou"] == pytest.approx(a["miou"]) and len(ev["iou"]) == 19
    assert ev["iou"]["road"] == pytest.approx(a["iou"]["road"])
    assert main(["evaluate", "--checkpoint", str(full / "checkpoint.pt"), "--max-images",
                 "1"]) == 0
    assert "images 1" in capsys.readouterr().out

    # a record-level run of the same config, then the Fig. 5 plot over both
    rec = tmp_path / "rec"
    assert main(["train", "--config", cfg, "--output", str(rec), "--quiet", "--accounting",
                 "record", "--max-steps", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # train --json: one object on stdout
    assert r == read(rec, "final_metrics.json")
    assert r["accounting"] == "record" and r["noise_multiplier"] > a["noise_multiplier"]
    assert main(["plot", str(full), str(rec), "--out", str(tmp_path / "fig.png"), "--json"]) == 0
    pts = json.loads(capsys.readouterr().out)
    assert {p["accounting"] for p in pts} == {"patch", "record"}
    assert (tmp_path / "fig.png").stat().st_size > 0


def _report_zs(text):
    return [float(z) for z in re.findall(r"steps \d+-\d+: z = ([0-9.e+-]+)", text)]


def test_budget_stop_when_resumed_with_more_epochs(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--output", str(run), "--quiet", "--epochs", "1"]) == 0
    z_first = read(run, "final_metrics.json")["noise_multiplier"]
    capsys.readouterr()
    # resuming with a longer plan recalibrates less noise; the spent budget stops it cleanly
    assert main(["train", "--config", cfg, "--output", str(run), "--quiet", "--epochs", "6"]) == 0
    final = read(run, "final_metrics.json")
    assert final["stopped"] and "budget" in final["stopped"]
    assert final["epsilon_patch"] <= 6.0
    assert final["steps"] < 6 * 3
    z_new = float(re.search(r"calibrated z=([0-9.]+)", capsys.readouterr().err).group(1))
    rep = read(run, "privacy_report.json")
    used = [s["noise_multiplier"] for s in rep["history_segments"]]
    assert used[0] == z_first and z_new != z_first
    assert _report_zs((run / "privacy_report.txt").read_text()) == pytest.approx(used)
    if z_new not in used:  # calibrated for the longer plan, never used: printed nowhere
        assert rep["noise_multiplier"] == z_first
        assert f"{z_new}" not in (run / "privacy_report.txt").read_text()


def test_report_prints_every_z_used_per_history_segment(tmp_path, capsys):
    """Interrupted after one of two planned epochs, resumed with three: the remaining steps
    use a z recalibrated for the longer plan.  The report lists each z with the steps it was
    used for, and names no single z for the run."""
    cfg = write_cfg(tmp_path)
    run = tmp_path / "run"
    fast = ["--quiet", "--set", "training.eval_every=5"]
    assert main(["train", "--config", cfg, "--output", str(run), *fast, "--max-steps", "3"]) == 0
    assert main(["train", "--config", cfg, "--output", str(run), *fast, "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    rep = read(run, "privacy_report.json")
    segments = rep["history_segments"]
    last = rep["steps"]  # 6: the third epoch would exceed the budget (first z too small)
    assert [(s["first_step"], s["last_step"]) for s in segments] == [(1, 3), (4, last)]
    z1, z2 = (s["noise_multiplier"] for s in segments)
    assert z2 > z1  # the longer plan needs more noise per step
    assert [tuple(h) for h in rep["history"]] == [(z1, 1 / 3, 3), (z2, 1 / 3, last - 3)]
    assert rep["noise_multiplier"] is None and rep["noise_multipliers_used"] == [z1, z2]
    assert read(run, "final_metrics.json")["noise_multiplier"] is None
    text = (run / "privacy_report.txt").read_text()
    assert f"steps 1-3: z = {z1} " in text and f"steps 4-{last}: z = {z2} " in text
    assert _report_zs(text) == [z1, z2]
    assert f"z = {z1:.6g} (steps 1-3), z = {z2:.6g} (steps 4-{last})" in out


NO_DROPOUT = ["--set", "model.extra.decoder_aspp_dropout=0", "--max-steps", "1"]


def _weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["module_state_dict"]


def test_noise_is_not_reproducible_from_the_seed(tmp_path, capsys):
    """Same seed, same batches and crops (reproducible_sampling), no dropout: the only
    randomness left is the noise, which comes from OS entropy by default (two runs differ) and
    from the seed with reproducible_noise (two runs agree); likewise the batches and crops.
    Nothing of it is in the checkpoint, and no training-batch statistic is in the outputs, the
    log or the progress bar."""
    cfg = write_cfg(tmp_path)
    sampling = ["--set", "privacy.reproducible_sampling=true"]
    runs = [tmp_path / f"os{i}" for i in range(2)]
    for run in runs:
        assert main(["train", "--config", cfg, "--output", str(run), *sampling,
                     *NO_DROPOUT]) == 0
    err = capsys.readouterr().err
    a, b = map(_weights, runs)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(runs[0] / "checkpoint.pt", weights_only=True)
    assert not {"torch_rng_state", "noise_generator_state"} & set(state)
    assert not any("loss" in str(k) for k in state) and not any(
        "loss" in k for row in state["metrics_rows"] for k in row)
    # progress bar: epoch k/N, logical steps, epsilon; no loss anywhere on screen
    assert "epoch 1/2" in err and "logical steps" in err and "epsilon patch" in err
    assert "loss" not in err.lower()
    # the compatibility report, with the frozen-parameter list, once per run
    assert err.count("Opacus compatibility changes") == 2
    assert err.count("net.encoder.layer3.0.conv1.weight") == 2
    rep = read(runs[0], "privacy_report.json")
    assert rep["noise_source"].startswith("drawn from OS entropy")
    assert "not recorded" in rep["train_loss"]
    assert "loss" not in (runs[0] / "metrics.csv").read_text()

    noise = ["--set", "privacy.reproducible_noise=true"]
    seeded = [tmp_path / f"seed{i}" for i in range(2)]
    for run in seeded:
        assert main(["train", "--config", cfg, "--output", str(run), "--quiet", *sampling,
                     *noise, *NO_DROPOUT]) == 0
    a, b = map(_weights, seeded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the batches and crops, too, come from OS entropy unless reproducible_sampling
    crops = [tmp_path / f"crops{i}" for i in range(2)]
    for run in crops:
        assert main(["train", "--config", cfg, "--output", str(run), "--quiet", *noise,
                     *NO_DROPOUT]) == 0
    a, b = map(_weights, crops)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_log_train_loss_is_opt_in_and_marked(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    run = tmp_path / "loss"
    assert main(["train", "--config", cfg, "--output", str(run), "--quiet",
                 "--set", "training.log_train_loss=true", "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"train loss [0-9.]+ \(not covered by epsilon\)", err)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["train_loss_not_covered_by_epsilon"]) > 0
    assert not [k for k in rows[0] if "loss" in k and "not_covered_by_epsilon" not in k]
    rep = read(run, "privacy_report.json")
    assert "NOT covered by epsilon" in rep["train_loss"]
    assert "training loss: recorded as train_loss_not_covered_by_epsilon" in \
        (run / "privacy_report.txt").read_text()


def _one_line_error(capsys, argv, *needles):
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("patchdp: error: ")
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs_exit_2_with_message(tmp_path, capsys):
    cfg = dict(TINY, dataset={"name": "cityscapes", "root": str(tmp_path / "nowhere"),
                              "train": {}, "val": {}})
    _one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, cfg, "cs.yaml"), "--quiet"],
                    "nowhere")
    _one_line_error(capsys, ["train", "--config", tmp_path / "missing.yaml"], "missing.yaml")
    bad = dict(TINY, training={**TINY["training"], "learning_rate": 1})
    _one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, bad, "bad.yaml")],
                    "training.learning_rate", "did you mean training.lr")
    big_crop = dict(TINY, privacy={**TINY["privacy"], "crop": [40, 40]})
    crop_out = tmp_path / "crop_run"
    _one_line_error(capsys, ["train", "--config", write_cfg(tmp_path, big_crop, "crop.yaml"),
                             "--quiet", "--output", crop_out], "crop")
    assert not crop_out.exists()  # a failed run leaves no (empty) output folder


def test_a_run_failing_in_its_first_epoch_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import patchdp_opacus.segmentation.train as train_module

    def broken(*args, **kwargs):
        raise ValueError("evaluation failed")

    monkeypatch.setattr(train_module, "evaluate", broken)
    out = tmp_path / "run"
    assert main(["train", "--config", write_cfg(tmp_path), "--output", str(out), "--quiet",
                 "--max-steps", "1"]) == 2
    assert "evaluation failed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, needles", [
    (["--set", "training.lr=fast"], ["--set training.lr=fast", "training.lr", "'fast'"]),
    (["--set", "privacy.crop=[505"], ["--set privacy.crop=[505", "not valid YAML"]),
    (["--set", "lr=0.1"], ["lr", "unknown"]),
    (["--set", "training.lr"], ["KEY=VALUE"]),
    (["--epsilon", "-1"], ["--epsilon -1", "privacy.epsilon", "> 0"]),
    (["--epsilon", "1", "--noise-multiplier", "1"], ["--epsilon", "--noise-multiplier"]),
    (["--set", "privacy.epsilon=null"], ["privacy.epsilon", "exactly one"]),
    (["--set", "training.batch_size=0"], ["training.batch_size", ">= 1"]),
    (["--set", "dataset.train.num_images=3"], ["dataset.train.num_images", "num_samples"]),
    (["--set", "model.arch=unet3"], ["model.arch", "deeplabv3plus"]),
    (["--set", "training.device=gpu"], ["training.device", "cuda"]),
    (["--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
    (["--lr", "0.1"], ["unrecognized arguments: --lr 0.1", "--set training.lr=0.1",
                       "'patchdp train --help'"]),
    (["training.lr=0.1"], ["--set training.lr=0.1", "'patchdp train --help'"]),
])
def test_train_refuses_bad_settings_before_building(tmp_path, capsys, monkeypatch, argv,
                                                    needles):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    _one_line_error(capsys, ["train", "--config", write_cfg(tmp_path), "--output", out, *argv],
                    *needles)
    assert not out.exists()


@pytest.mark.parametrize("text, needles", [
    ("name: x\ntraining: {lr: 0.1\n", ["not valid YAML", "line 3"]),
    ("training:\n  lr: fast\n", ["training.lr", "'fast'"]),
    ("- just\n- a list\n", ["mapping"]),
    ("trainig: {}\n", ["trainig", "did you mean training"]),
])
def test_malformed_config_files_exit_2(tmp_path, capsys, text, needles):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _one_line_error(capsys, ["train", "--config", path], f"--config {path}", *needles)


def test_evaluate_and_plot_refuse_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    _one_line_error(capsys, ["evaluate", "--checkpoint", not_ckpt], "not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    _one_line_error(capsys, ["evaluate", "--checkpoint", tmp_path / "other.pt"],
                    "not written by 'patchdp train'")
    _one_line_error(capsys, ["evaluate", "--checkpoint", tmp_path / "none.pt"], "does not exist")
    _one_line_error(capsys, ["evaluate", "--checkpoint", not_ckpt, "--max-images", "0"],
                    "--max-images", "positive")
    _one_line_error(capsys, ["evaluate", "--checkpoint", not_ckpt, "--nonsense"],
                    "'patchdp evaluate --help'")
    _one_line_error(capsys, ["plot", tmp_path / "nope", "--out", tmp_path / "f.png"], "nope")
    broken = tmp_path / "runs" / "a"
    broken.mkdir(parents=True)
    (broken / "final_metrics.json").write_text("{not json")
    _one_line_error(capsys, ["plot", tmp_path / "runs", "--out", tmp_path / "f.png"],
                    "final_metrics.json")
    _one_line_error(capsys, ["plot", tmp_path / "runs", "--out", tmp_path / "f.txt"], "--out")


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


def test_gaussian_augmentation_segmentation_run_resumes_exactly(tmp_path, capsys):
    """The Gaussian-augmentation baseline on segmentation (paper Fig. 11): its epsilon beside
    patch and record level in every output; with reproducible noise and sampling a resumed run
    equals an uninterrupted one (the augmentation noise stream is restored too), and the
    augmentation noise's state is stored only then."""
    cfg = write_cfg(tmp_path)
    no_dropout = NO_DROPOUT[:2]
    ga = ["--accounting", "gaussian_augmentation", "--sigma-aug", "5000", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--config", cfg, "--output", str(full), *ga, *REPRODUCIBLE,
                 *no_dropout]) == 0
    out = capsys.readouterr().out
    assert "Gaussian augmentation (sigma_aug 5000" in out
    assert main(["train", "--config", cfg, "--output", str(part), *ga, *REPRODUCIBLE,
                 *no_dropout, "--max-steps", "3"]) == 0
    assert main(["train", "--config", cfg, "--output", str(part), *ga, *REPRODUCIBLE,
                 *no_dropout]) == 0
    a, b = read(full, "final_metrics.json"), read(part, "final_metrics.json")
    assert a["epsilon_gaussian_augmentation"] == b["epsilon_gaussian_augmentation"] <= 6.0
    assert a["epsilon_gaussian_augmentation"] < a["epsilon_record"]
    wa, wb = _weights(full), _weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = torch.load(full / "checkpoint.pt", weights_only=True)
    assert "patchdp_augmentation_rng_state" in state
    report = read(full, "privacy_report.json")
    assert report["target"]["level"] == "gaussian_augmentation"
    assert "seed stays secret" in report["augmentation_source"]
    with open(full / "metrics.csv") as f:
        assert "epsilon_gaussian_augmentation" in next(csv.reader(f))
    capsys.readouterr()
    assert main(["plot", str(full), "--out", str(tmp_path / "fig11.png"), "--json"]) == 0
    (point,) = json.loads(capsys.readouterr().out)
    assert point["accounting"] == "gaussian_augmentation" and point["sigma_aug"] == 5000
    assert point["metric"] == "miou" and "miou_mean" in point


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


@pytest.mark.parametrize("flag", ["reproducible_noise", "reproducible_sampling", "secure_sampling"])
def test_a_checkpoint_resumes_only_under_its_noise_and_sampling_sources(tmp_path, capsys, flag):
    """The report states one noise source and one sampling source for the whole run: a run
    begun with noise or batches from the config seed cannot be continued as if private."""
    cfg, run = write_cfg(tmp_path), str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--output", run, "--quiet", "--max-steps", "1",
                 "--set", f"privacy.{flag}=true"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--output", run, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"privacy.{flag}" in err and f"--set privacy.{flag}=true" in err, err
