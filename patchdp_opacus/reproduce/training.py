"""What the paper's training figures need: the grid each one runs, the data, and an estimate of
the GPU time. :func:`instructions` returns the lines to print; ``patchdp reproduce FIGURE
--data-root ROOT`` runs the grids (:mod:`.grid`) and draws the figure (:mod:`.cli`).

GPU-hour estimates: images per run (N x epochs) over the DP-training throughput measured on one
H100 at the paper's configuration (the project's measurements: DeepLabV3+ 21.6 img/s, dilated
PSPNet 31.9 img/s, frozen BatchNorm, Opacus hooks, physical batch 16, fp32); classification is not
measured yet — the authors' jobs were capped at 2.5 h on one A100 per run, quoted as an
upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from patchdp_opacus.reproduce.grid import DEFAULT_SIGMA_AUG, EPSILONS, SEEDS

__all__ = ["EPSILONS", "SEEDS", "TRAINING_FIGURES", "TrainingFigure", "instructions"]

GAUSS = ("sigma_aug (pixel units) of the Gaussian-augmentation runs: --sigma-aug, default "
         f"{DEFAULT_SIGMA_AUG:g} (the paper calibrated it per epsilon and did not export the "
         "values); the patch/record runs are those of Fig. 5 (a finished run is skipped)")


@dataclass(frozen=True)
class Grid:
    """One config's grid: ``config`` path, images per run (N x epochs), DP img/s on one GPU
    (None = not measured; ``cap_hours`` then bounds a run), accountings run."""

    config: str
    data: str
    images_per_run: int
    images_per_second: float | None = None
    cap_hours: float | None = None
    accountings: tuple = ("patch", "record")
    epsilons: tuple = EPSILONS

    @property
    def dataset(self) -> str:
        """The data set's name (the folder of the config): what ``--data-root NAME=PATH``
        names."""
        return self.config.split("/")[-2]

    @property
    def runs(self) -> int:
        return len(self.epsilons) * len(SEEDS) * len(self.accountings)

    def gpu_hours(self) -> str:
        if self.images_per_second:
            per_run = self.images_per_run / self.images_per_second / 3600
            return (f"~{per_run:.1f} GPU-h per run, ~{per_run * self.runs:.0f} GPU-h for "
                    f"{self.runs} runs")
        return (f"not measured; at most {self.cap_hours:g} GPU-h per run (the authors' cap), "
                f"<= {self.cap_hours * self.runs:.0f} GPU-h for {self.runs} runs")


CITYSCAPES = "Cityscapes: ROOT/leftImg8bit/{train,val}/<city>/*.png + ROOT/gtFine/..."
A2D2 = "A2D2 camera_lidar_semantic: ROOT/<session>/camera|label/cam_front_center + class_list.json"
DTD = ("DTD 300x300 copy: python scripts/preprocess_dtd.py RAW ROOT (RAW = the official "
       "dtd-r1.0.1 archive, images/ + labels/); or RAW itself with configs/dtd/*_resize.yaml "
       "(the resize in the loader)")
MNIST = "MNIST idx files (train/t10k images+labels, .gz or plain) in ROOT or ROOT/MNIST/raw"


WITH_GAUSS = ("patch", "record", "gaussian_augmentation")


def _seg(config, data, n, epochs, rate, accountings=("patch", "record")):
    return Grid(config, data, n * epochs, rate, accountings=accountings)


@dataclass(frozen=True)
class TrainingFigure:
    title: str
    grids: tuple
    notes: tuple = ()
    plot: str = "patchdp plot runs/<dataset>_<model> --out FIG.png"
    table: bool = False  # a table of final accuracies instead of a plot (Table 1)


TRAINING_FIGURES: dict[str, TrainingFigure] = {
    "fig5": TrainingFigure(
        "mIoU vs ε, patch-level vs record-level (Cityscapes DeepLabV3+ and PSPNet, A2D2 PSPNet; "
        "A2D2 DeepLabV3+ is Fig. 9-10; per-seed views Fig. 6-10 come from the same runs)",
        (_seg("configs/cityscapes/deeplabv3plus.yaml", CITYSCAPES, 2975, 100, 21.6),
         _seg("configs/cityscapes/pspnet.yaml", CITYSCAPES, 2975, 100, 31.9),
         _seg("configs/a2d2/pspnet.yaml", A2D2, 18557, 25, 31.9),
         _seg("configs/a2d2/deeplabv3plus.yaml", A2D2, 18557, 25, 21.6))),
    "fig11": TrainingFigure(
        "mIoU vs ε: Gaussian-noise augmentation beside patch and record level, Cityscapes",
        (_seg("configs/cityscapes/deeplabv3plus.yaml", CITYSCAPES, 2975, 100, 21.6, WITH_GAUSS),
         _seg("configs/cityscapes/pspnet.yaml", CITYSCAPES, 2975, 100, 31.9, WITH_GAUSS)),
        (GAUSS,)),
    "fig12": TrainingFigure(
        "mIoU vs ε: Gaussian-noise augmentation beside patch and record level, A2D2",
        (_seg("configs/a2d2/deeplabv3plus.yaml", A2D2, 18557, 25, 21.6, WITH_GAUSS),
         _seg("configs/a2d2/pspnet.yaml", A2D2, 18557, 25, 31.9, WITH_GAUSS)), (GAUSS,)),
    "fig13": TrainingFigure(
        "DTD top-1 accuracy vs ε, ResNet-18 and VGG-11 (per-seed views Fig. 15-16)",
        (Grid("configs/dtd/resnet18.yaml", DTD, 1879 * 150, cap_hours=2.5),
         Grid("configs/dtd/vgg11.yaml", DTD, 1879 * 150, cap_hours=2.5)),
        ("evaluation on whole val images (as the paper's code); the paper reports test "
         "accuracy: patchdp evaluate --checkpoint RUN/checkpoint.pt --split test",
         "ImageNet weights are downloaded by torchvision on the first run")),
    "fig14": TrainingFigure(
        "MNIST top-1 accuracy vs ε, ResNet-18 and VGG-11 (crop 10, patch 1x1)",
        (Grid("configs/mnist/resnet18.yaml", MNIST, 55000 * 15, cap_hours=2.5),
         Grid("configs/mnist/vgg11.yaml", MNIST, 55000 * 15, cap_hours=2.5))),
    "table1": TrainingFigure(
        "MNIST non-private accuracy with and without the 10x10 crop (ResNet-18; the VGG-11 row: "
        "the same configs with --set model.arch=vgg11 --set training.lr=0.002)",
        (Grid("configs/mnist/table1_nocrop.yaml", MNIST, 55000 * 15, cap_hours=2.5,
              accountings=("none",), epsilons=(None,)),
         Grid("configs/mnist/table1_crop.yaml", MNIST, 55000 * 15, cap_hours=2.5,
              accountings=("none",), epsilons=(None,))),
        ("paper: no crop 99.4 % (VGG-11 99.2 %), crop 10 26.0 % (VGG-11 16.7 %), test split",),
        plot="TABLE.csv: test accuracy per config, mean ± std over seeds", table=True),
}


def _command(grid: Grid) -> str:
    acc = "" if grid.accountings == ("patch", "record") else \
        f" --accounting {' '.join(grid.accountings)}"
    return (f"python scripts/run_paper_grid.py --config {grid.config}{acc} --gpus 0 1 2 3 "
            f"-- --data-root ROOT")


def instructions(name: str) -> list[str]:
    """The lines that tell a user how to produce training figure ``name``."""
    fig = TRAINING_FIGURES[name]
    lines = [f"{name}: {fig.title}",
             f"  run it: patchdp reproduce {name} --data-root ROOT [--gpus 0 1 2 3] "
             f"(runs the grids below, then {'writes the table' if fig.table else 'plots'})"]
    for grid in fig.grids:
        lines += [f"  {_command(grid)}",
                  f"      data ({grid.dataset}): {grid.data}",
                  f"      GPU time: {grid.gpu_hours()}"]
    lines.append(f"  then: {fig.plot}")
    lines += [f"  note: {n}" for n in fig.notes]
    return lines
