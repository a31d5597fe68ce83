"""What the paper's training figures need: the grid each one runs, the data, and an estimate of
the GPU time. Nothing is run from here; :func:`instructions` returns the lines to print.

GPU-hour estimates: images per run (N x epochs) over the DP-training throughput measured on one
H100 at the paper's configuration (measured before this package: DeepLabV3+ 21.6 img/s, PSPNet 31.9
img/s, frozen BatchNorm, Opacus hooks, physical batch 16, fp32); classification throughput is
not measured yet — the authors' jobs were capped at 2.5 h on one A100 per run, quoted as an
upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EPSILONS", "SEEDS", "TRAINING_FIGURES", "TrainingFigure", "instructions"]

EPSILONS = (1, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)
SEEDS = (10, 20, 30, 516)
PHASE_B = ("needs the classification integration of issue 14 (phase B): 'patchdp train' does not "
           "read 'task: classification' configs yet")
GAUSS_B = ("needs the Gaussian-augmentation training baseline of issue 14 (phase B): "
           "'privacy.accounting: gaussian_augmentation' and run_paper_grid.py --accounting "
           "gaussian_augmentation do not exist yet")


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
       "dtd-r1.0.1 archive, images/ + labels/)")
MNIST = "MNIST idx files (train/t10k images+labels, .gz or plain) in ROOT or ROOT/MNIST/raw"


def _seg(config, data, n, epochs, rate, accountings=("patch", "record")):
    return Grid(config, data, n * epochs, rate, accountings=accountings)


@dataclass(frozen=True)
class TrainingFigure:
    title: str
    grids: tuple
    status: str = "runs now"
    plot: str = "patchdp plot runs/<dataset>_<model> --out FIG.png"
    notes: tuple = ()


TRAINING_FIGURES: dict[str, TrainingFigure] = {
    "fig5": TrainingFigure(
        "mIoU vs ε, patch-level vs record-level (Cityscapes DeepLabV3+ and PSPNet, A2D2 PSPNet; "
        "A2D2 DeepLabV3+ is Fig. 9-10; per-seed views Fig. 6-10 come from the same runs)",
        (_seg("configs/cityscapes/deeplabv3plus.yaml", CITYSCAPES, 2975, 100, 21.6),
         _seg("configs/cityscapes/pspnet.yaml", CITYSCAPES, 2975, 100, 31.9),
         _seg("configs/a2d2/pspnet.yaml", A2D2, 18557, 25, 31.9),
         _seg("configs/a2d2/deeplabv3plus.yaml", A2D2, 18557, 25, 21.6))),
    "fig11": TrainingFigure(
        "mIoU vs ε with Gaussian-noise augmentation, Cityscapes (patch/record runs shared with "
        "Fig. 5)",
        (_seg("configs/cityscapes/deeplabv3plus.yaml", CITYSCAPES, 2975, 100, 21.6,
              ("gaussian_augmentation",)),
         _seg("configs/cityscapes/pspnet.yaml", CITYSCAPES, 2975, 100, 31.9,
              ("gaussian_augmentation",))), GAUSS_B),
    "fig12": TrainingFigure(
        "mIoU vs ε with Gaussian-noise augmentation, A2D2 (patch/record runs shared with Fig. 5)",
        (_seg("configs/a2d2/deeplabv3plus.yaml", A2D2, 18557, 25, 21.6,
              ("gaussian_augmentation",)),
         _seg("configs/a2d2/pspnet.yaml", A2D2, 18557, 25, 31.9, ("gaussian_augmentation",))),
        GAUSS_B),
    "fig13": TrainingFigure(
        "DTD top-1 accuracy vs ε, ResNet-18 and VGG-11 (per-seed views Fig. 15-16)",
        (Grid("configs/dtd/resnet18.yaml", DTD, 1879 * 150, cap_hours=2.5),
         Grid("configs/dtd/vgg11.yaml", DTD, 1879 * 150, cap_hours=2.5)), PHASE_B),
    "fig14": TrainingFigure(
        "MNIST top-1 accuracy vs ε, ResNet-18 and VGG-11 (crop 10, patch 1x1)",
        (Grid("configs/mnist/resnet18.yaml", MNIST, 55000 * 15, cap_hours=2.5),
         Grid("configs/mnist/vgg11.yaml", MNIST, 55000 * 15, cap_hours=2.5)), PHASE_B),
    "table1": TrainingFigure(
        "MNIST non-private accuracy with and without the 10x10 crop (ResNet-18; the VGG-11 row: "
        "the same configs with model.arch: vgg11)",
        (Grid("configs/mnist/table1_nocrop.yaml", MNIST, 55000 * 15, cap_hours=2.5,
              accountings=("none",), epsilons=(None,)),
         Grid("configs/mnist/table1_crop.yaml", MNIST, 55000 * 15, cap_hours=2.5,
              accountings=("none",), epsilons=(None,))), PHASE_B,
        plot="read final_metrics.json of each run (accuracy)"),
}


def _command(grid: Grid) -> str:
    if grid.epsilons == (None,):
        return (f"for s in {' '.join(map(str, SEEDS))}; do patchdp train --config {grid.config} "
                f"--seed $s --data-root ROOT; done")
    acc = "" if grid.accountings == ("patch", "record") else \
        f" --accounting {' '.join(grid.accountings)}"
    return (f"python scripts/run_paper_grid.py --config {grid.config}{acc} --gpus 0 1 2 3 "
            f"-- --data-root ROOT")


def instructions(name: str) -> list[str]:
    """The lines that tell a user how to produce training figure ``name``."""
    fig = TRAINING_FIGURES[name]
    lines = [f"{name}: {fig.title}", f"  status: {fig.status}"]
    for grid in fig.grids:
        lines += [f"  {_command(grid)}",
                  f"      data: {grid.data}",
                  f"      GPU time: {grid.gpu_hours()}"]
    lines.append(f"  then: {fig.plot}")
    lines += [f"  note: {n}" for n in fig.notes]
    return lines
