"""The training side of `patchdp reproduce`: the grid runner (runs to do, their names and flags,
finished runs skipped) and one training figure run end to end on generated MNIST files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from classification_data import write_mnist

from patchdp_opacus.cli import main
from patchdp_opacus.reproduce.cli import accuracy_table
from patchdp_opacus.reproduce.grid import build_jobs, grid_root
from patchdp_opacus.reproduce.training import TRAINING_FIGURES

ROOT = Path(__file__).resolve().parents[1]


def test_grid_names_its_runs_and_skips_finished_ones(tmp_path):
    config = "configs/cityscapes/deeplabv3plus.yaml"
    assert grid_root(config) == Path("runs/cityscapes_deeplabv3plus")
    jobs = build_jobs(config, epsilons=[1, 5], seeds=[10, 20], out=tmp_path,
                      accountings=["patch", "record", "gaussian_augmentation", "none"],
                      sigma_augs=[255, 2550], extra=["--data-root", "d"])
    names = [job.out.name for job in jobs]
    assert len(names) == len(set(names)) == 2 * 2 * (1 + 1 + 2) + 2
    assert names[:5] == ["none_seed10", "none_seed20", "patch_eps1_seed10",
                         "record_eps1_seed10", "gaussian_augmentation_sigma255_eps1_seed10"]
    ga = next(j for j in jobs if j.out.name == "gaussian_augmentation_sigma2550_eps5_seed20")
    assert list(ga.cmd[-2:]) == ["--data-root", "d"]
    assert ga.cmd[ga.cmd.index("--sigma-aug") + 1] == "2550"
    assert ga.cmd[ga.cmd.index("--accounting") + 1] == "gaussian_augmentation"
    (tmp_path / "patch_eps1_seed10").mkdir()
    (tmp_path / "patch_eps1_seed10" / "final_metrics.json").write_text("{}")
    again = build_jobs(config, epsilons=[1, 5], seeds=[10, 20], out=tmp_path,
                       accountings=["patch"])
    assert [j.out.name for j in again] == ["patch_eps1_seed20", "patch_eps5_seed10",
                                           "patch_eps5_seed20"]


def test_every_training_figure_runs_the_accountings_it_plots():
    assert set(TRAINING_FIGURES) == {"fig5", "fig11", "fig12", "fig13", "fig14", "table1"}
    for name in ("fig11", "fig12"):
        for grid in TRAINING_FIGURES[name].grids:
            assert grid.accountings == ("patch", "record", "gaussian_augmentation")
    for grid in TRAINING_FIGURES["table1"].grids:
        assert grid.accountings == ("none",) and grid.dataset == "mnist"
    for fig in TRAINING_FIGURES.values():
        for grid in fig.grids:
            assert (ROOT / grid.config).is_file()


def test_table1_is_mean_and_std_of_the_runs_accuracy(tmp_path):
    class Grid:
        config = "configs/mnist/table1_crop.yaml"

    for seed, acc in ((10, 0.25), (20, 0.27)):
        run = tmp_path / f"none_seed{seed}"
        run.mkdir()
        (run / "final_metrics.json").write_text(json.dumps(
            {"accounting": "none", "target_epsilon": None, "accuracy": acc, "split": "test"}))
    (row,) = accuracy_table([(Grid, tmp_path)])
    assert row["seeds"] == 2 and row["split"] == "test"
    assert abs(row["accuracy_mean"] - 0.26) < 1e-12 and abs(row["accuracy_std"] - 0.01) < 1e-12


def test_reproduce_fig14_runs_the_grid_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # the runs' subprocesses
    data = write_mnist(tmp_path / "mnist")
    shrink = ["training.batch_size=4", "training.max_physical_batch_size=2", "training.epochs=1",
              "training.max_steps=1", "training.device=cpu", "training.num_workers=0",
              "dataset.train.val_size=8", "dataset.val.val_size=8", "training.eval_batch_size=8"]
    argv = ["reproduce", "fig14", "--data-root", str(data), "--only", "resnet18",
            "--epsilons", "8", "--seeds", "3", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "figs")] + [a for s in shrink for a in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 run(s) to do" in out and "skipped" not in out
    points = json.loads((tmp_path / "figs" / "fig14_mnist_resnet18.json").read_text())
    assert {(p["accounting"], p["metric"], p["epsilon"]) for p in points} == {
        ("patch", "accuracy", 8.0), ("record", "accuracy", 8.0)}
    assert (tmp_path / "figs" / "fig14_mnist_resnet18.png").stat().st_size > 0
    assert main(argv) == 0  # everything done: nothing is run again, the figure is redrawn
    assert "0 run(s) to do" in capsys.readouterr().out
