"""`patchdp train / evaluate / plot` for `task: classification`, end to end on tiny generated
MNIST idx files and a DTD-like folder, through the shipped configs (shrunk with --set):
patch, Gaussian-augmentation and non-private (Table 1) runs, the offline and the in-loader DTD
resize, evaluation on whole images, resume refused under another accounting."""

import csv
import json

import pytest
from classification_data import DTD_CLASSES, write_dtd, write_mnist

from patchdp_opacus.cli import main
from patchdp_opacus.privacy import PatchDPSGD, epsilon, gaussian_augmentation_tv

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
#: Shrinks any shipped classification config to seconds on a CPU.
SMALL = ["--quiet", "--max-steps", "2", "--epochs", "1", "--device", "cpu",
         "--set", "training.batch_size=4", "--set", "training.max_physical_batch_size=2",
         "--set", "training.num_workers=0", "--set", "training.eval_batch_size=8"]
MNIST_SMALL = [*SMALL, "--set", "dataset.train.val_size=8"]


def read(run, name="final_metrics.json"):
    return json.loads((run / name).read_text(), parse_constant=lambda c: pytest.fail(c))


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def mnist_runs(mnist, tmp_path_factory):
    """A patch-level run and a Gaussian-augmentation run of configs/mnist/resnet18.yaml."""
    root = tmp_path_factory.mktemp("runs")
    config = str(CONFIGS / "mnist" / "resnet18.yaml")
    common = ["train", "--config", config, "--data-root", str(mnist), *MNIST_SMALL,
              "--set", "dataset.val.val_size=8", "--epsilon", "8"]
    patch, gauss = root / "patch", root / "gauss"
    assert main([*common, "--output", str(patch)]) == 0
    assert main([*common, "--output", str(gauss), "--accounting", "gaussian_augmentation",
                 "--sigma-aug", "300"]) == 0
    return patch, gauss


def test_mnist_patch_level_run_records_accuracy_and_the_claim(mnist_runs, mnist, capsys):
    patch, _ = mnist_runs
    final = read(patch)
    assert final["task"] == "classification" and final["accounting"] == "patch"
    assert 0.0 <= final["accuracy"] <= 1.0 and final["num_images"] == 8
    assert set(final["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert final["per_class_accuracy"]["9"] is None  # no val image of digit 9: absent
    assert final["steps"] == 2 and final["epsilon_patch"] < final["epsilon_record"]
    assert "confusion_matrix" not in final and "miou" not in final
    report = read(patch, "privacy_report.json")
    assert report["geometry"]["inclusion_fraction"] == "100/361"  # crop 10 on 28x28, 1x1 patch
    (row,) = rows(patch)
    assert row["accuracy"] and row["mean_per_class_accuracy"] and "miou" not in row
    assert float(row["lr"]) == 0.01  # the lr of the epoch (cosine decays it afterwards)

    capsys.readouterr()
    ckpt = str(patch / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", ckpt, "--split", "test", "--json",
                 "--confusion-matrix", "--data", str(mnist)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["num_images"] == 16 and ev["split"] == "test"
    matrix = ev["confusion_matrix"]["rows_true_columns_predicted"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 16
    assert main(["evaluate", "--checkpoint", ckpt, "--max-images", "4"]) == 0
    out = capsys.readouterr().out
    assert "images 4 (val)" in out and "top-1 accuracy" in out and "per-class accuracy" in out


def test_gaussian_augmentation_run_calibrates_and_reports_its_own_epsilon(mnist_runs):
    patch, gauss = mnist_runs
    final, report = read(gauss), read(gauss, "privacy_report.json")
    tv = gaussian_augmentation_tv(300.0, (1, 1), 1)  # MNIST: one channel, a 1x1 patch
    assert final["augmentation_tv"] == tv and final["sigma_aug"] == 300.0
    z, q = final["noise_multiplier"], report["sample_rate"]
    assert final["epsilon_gaussian_augmentation"] == pytest.approx(
        epsilon(PatchDPSGD(z, q, tv, final["steps"]), final["delta"]), rel=1e-12)
    assert report["target"]["level"] == "gaussian_augmentation"
    assert epsilon(PatchDPSGD(z, q, tv, report["target"]["steps"]), final["delta"]) <= 8.0
    # the noise is the loader's and secret: not derived from the config seed
    assert "OS entropy" in report["augmentation_source"]
    assert report["geometry"]["augmentation"]["channels"] == 1
    text = (gauss / "privacy_report.txt").read_text()
    assert "epsilon (Gaussian augmentation)" in text and "before any resampling" in text
    assert rows(gauss)[0]["epsilon_gaussian_augmentation"]
    assert "epsilon_gaussian_augmentation" not in read(patch)


def test_plot_draws_accuracy_per_accounting(mnist_runs, tmp_path, capsys):
    patch, gauss = mnist_runs
    capsys.readouterr()
    assert main(["plot", str(patch), str(gauss), "--out", str(tmp_path / "fig14.png"),
                 "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert {(p["accounting"], p["metric"]) for p in points} == {
        ("patch", "accuracy"), ("gaussian_augmentation", "accuracy")}
    assert (tmp_path / "fig14.png").stat().st_size > 0


def test_a_checkpoint_resumes_only_under_its_accounting(mnist_runs, mnist, capsys):
    patch, _ = mnist_runs
    config = str(CONFIGS / "mnist" / "resnet18.yaml")
    before = (patch / "final_metrics.json").read_text()
    assert main(["train", "--config", config, "--data-root", str(mnist), *MNIST_SMALL,
                 "--set", "dataset.val.val_size=8", "--epsilon", "8", "--accounting", "record",
                 "--output", str(patch)]) == 2
    err = capsys.readouterr().err
    assert "trained with accounting 'patch'" in err and "--accounting patch" in err
    assert (patch / "final_metrics.json").read_text() == before


@pytest.mark.parametrize("name", ["table1_nocrop", "table1_crop"])
def test_table1_runs_are_non_private(name, mnist, tmp_path):
    run = tmp_path / name
    assert main(["train", "--config", str(CONFIGS / "mnist" / f"{name}.yaml"), "--data-root",
                 str(mnist), *MNIST_SMALL, "--output", str(run)]) == 0
    final = read(run)
    assert final["accounting"] == "none" and final["epsilon_patch"] is None
    assert final["steps"] == 2 and final["split"] == "test" and final["num_images"] == 16
    assert sum(map(sum, final["confusion_matrix"]["rows_true_columns_predicted"])) == 16
    assert "non-private" in (run / "privacy_report.txt").read_text()
    assert rows(run)[0]["epsilon_patch"] == ""


DTD_SMALL = [*SMALL, "--set", "model.weights=null", "--set", "model.num_classes=3",
             "--set", "privacy.crop=[12,12]", "--set", "privacy.private_region.size=[3,3]"]


def test_dtd_with_the_offline_resize(tmp_path):
    data = write_dtd(tmp_path / "dtd300", sizes=((32, 32),))  # as if preprocessed (to 32x32)
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "dtd" / "resnet18.yaml"), "--data-root",
                 str(data), *DTD_SMALL, "--set", "dataset.train.image_size=[32,32]",
                 "--set", "dataset.val.image_size=[32,32]", "--set", "dataset.train.min_side=32",
                 "--set", "dataset.val.min_side=32", "--output", str(run),
                 "--noise-multiplier", "1"]) == 0
    final, report = read(run), read(run, "privacy_report.json")
    assert set(final["per_class_accuracy"]) == set(DTD_CLASSES) and final["num_images"] == 3
    # Lemma 1, crop 12 on 32x32 (21 origins per axis), central 3x3 patch: (14/21)^2
    assert report["geometry"]["inclusion_fraction"] == "4/9"


def test_dtd_with_the_resize_in_the_loader_and_gaussian_augmentation(tmp_path):
    data = write_dtd(tmp_path / "dtd")  # raw sizes 36x40, 40x36, 38x38
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "dtd" / "resnet18_resize.yaml"),
                 "--data-root", str(data), *DTD_SMALL, "--set", "dataset.train.min_side=30",
                 "--set", "dataset.val.min_side=30",
                 "--set", "privacy.transform={kind: resize, size: [32, 32]}",
                 "--accounting", "gaussian_augmentation", "--sigma-aug", "2000",
                 "--noise-multiplier", "1", "--output", str(run)]) == 0
    final, report = read(run), read(run, "privacy_report.json")
    geometry = report["geometry"]
    assert sorted(map(tuple, geometry["image_sizes"])) == [(36, 40), (38, 38), (40, 36)]
    assert geometry["crop"]["kind"] == "resize" and 0 < geometry["inclusion_probability"] < 1
    assert geometry["augmentation"]["channels"] == 3
    assert final["num_images"] == 3  # whole val images, resized to 32x32 as in training
    assert final["epsilon_gaussian_augmentation"] < final["epsilon_record"]
