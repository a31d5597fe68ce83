"""``patchdp train`` / ``evaluate`` / ``plot``: the segmentation application.

Heavy imports (torch, opacus, smp, matplotlib) happen inside the handlers."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from patchdp_opacus.commands import HelpFormatter, UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train a segmentation model with patch-level DP-SGD",
        description="Train with DP-SGD. The noise is calibrated for --epsilon with the chosen "
                    "accounting (patch level, or the record-level baseline: the same training "
                    "algorithm, a different analysis). Resumes from OUTPUT/checkpoint.pt.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--epsilon", type=float, help="target epsilon (nats); overrides the config")
    p.add_argument("--accounting", choices=("patch", "record"),
                   help="analysis used to calibrate the noise; overrides the config")
    p.add_argument("--noise-multiplier", type=float,
                   help="fixed noise multiplier z (std = z*C) instead of calibrating for epsilon")
    p.add_argument("--seed", type=int, help="seed of model init, batches and crops")
    p.add_argument("--epochs", type=int, help="override training.epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many logical steps")
    p.add_argument("--data-root", help="override dataset.root")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--output", help="run folder (default runs/<name>/<accounting>_eps<E>_seed<S>)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train)

    e = subparsers.add_parser("evaluate", formatter_class=HelpFormatter,
                              help="pixel accuracy, per-class IoU and mIoU of a checkpoint",
                              description="Evaluate a checkpoint written by 'patchdp train' on "
                                          "full-resolution images.")
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run")
    e.add_argument("--data", help="dataset root (default: the run's config)")
    e.add_argument("--split", default="val", help="dataset split")
    e.add_argument("--max-images", type=int, help="evaluate only the first N images")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=cmd_evaluate)

    pl = subparsers.add_parser("plot", formatter_class=HelpFormatter,
                               help="mIoU vs epsilon, patch vs record level (mean ± std over seeds)",
                               description="Plot runs written by 'patchdp train' (paper Fig. 5).")
    pl.add_argument("runs", nargs="+", help="run folders (or folders containing them)")
    pl.add_argument("--out", required=True, help="output figure (.png/.pdf/.svg)")
    pl.add_argument("--json", action="store_true", help="also print the aggregated points")
    pl.set_defaults(handler=cmd_plot)


def _load_cfg(args):
    from patchdp_opacus.segmentation.config import load_config

    try:
        cfg = load_config(args.config)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--config {args.config}: {exc}") from None
    if args.epsilon is not None:
        if not args.epsilon > 0:
            raise UsageError(f"--epsilon must be > 0, got {args.epsilon}")
        cfg.privacy.epsilon, cfg.privacy.noise_multiplier = args.epsilon, None
    if args.noise_multiplier is not None:
        if not args.noise_multiplier > 0:
            raise UsageError(f"--noise-multiplier must be > 0, got {args.noise_multiplier}")
        cfg.privacy.noise_multiplier, cfg.privacy.epsilon = args.noise_multiplier, None
    if args.accounting:
        cfg.privacy.accounting = args.accounting
    for flag, attr in (("seed", "seed"), ("epochs", "epochs"), ("max_steps", "max_steps"),
                       ("device", "device")):
        if getattr(args, flag) is not None:
            setattr(cfg.training, attr, getattr(args, flag))
    if args.data_root:
        cfg.dataset.root = args.data_root
    return cfg


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not at set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """Show the library's INFO messages (epoch summaries, calibration) on stderr, and hide
    the torch warning every Opacus step triggers because image inputs need no gradient."""
    import warnings

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("patchdp_opacus")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a dependency configures the root logger too: print once
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are "
                                              "computed with respect to module outputs")


def default_output(cfg) -> Path:
    level = cfg.privacy.accounting
    tag = f"eps{cfg.privacy.epsilon:g}" if cfg.privacy.epsilon is not None \
        else f"z{cfg.privacy.noise_multiplier:g}"
    return Path("runs") / cfg.name / f"{level}_{tag}_seed{cfg.training.seed}"


def cmd_train(args) -> int:
    cfg = _load_cfg(args)
    from tqdm import tqdm

    from patchdp_opacus.segmentation.train import train

    _setup_logging()
    out = Path(args.output) if args.output else default_output(cfg)
    progress = None if args.quiet else (lambda it: tqdm(it, leave=False, desc="train",
                                                        file=sys.stderr))
    try:
        final = train(cfg, out, resume=not args.no_resume, progress=progress)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UsageError(f"data: {exc} (set dataset.root in --config or --data-root)") from None
    except ValueError as exc:  # geometry, data or configuration the analysis cannot accept
        raise UsageError(f"--config {args.config}: {exc}") from None
    if "rank" in final:  # a non-zero torchrun rank: rank 0 reports
        return 0
    print(f"run folder: {out}")
    print(f"steps {final['steps']}, noise multiplier z = {final['noise_multiplier']:.4g}, "
          f"delta = {final['delta']:.3g}, noise calibrated for {final['accounting']}-level "
          f"epsilon {final['target_epsilon']}")
    print(f"epsilon  patch level: {final['epsilon_patch']:.4g}   "
          f"record level: {final['epsilon_record']:.4g}")
    print(f"mIoU {final['miou']:.4f} (majority-class baseline {final['majority_class_miou']:.4f}),"
          f" pixel accuracy {final['pixel_accuracy']:.4f}")
    if final.get("stopped"):
        print(final["stopped"])
    return 0


def cmd_evaluate(args) -> int:
    path = Path(args.checkpoint)
    if not path.is_file():
        raise UsageError(f"--checkpoint {path} does not exist")
    import torch

    from patchdp_opacus.segmentation.config import config_from_dict
    from patchdp_opacus.segmentation.train import (
        build_segmentation_model,
        evaluate,
        resolve_device,
    )
    from patchdp_opacus.segmentation.datasets import build_dataset

    state = torch.load(path, map_location="cpu", weights_only=False)
    if "config" not in state or "module_state_dict" not in state:
        raise UsageError(f"--checkpoint {path} was not written by 'patchdp train'")
    cfg = config_from_dict(state["config"], where=str(path))
    if args.data:
        cfg.dataset.root = args.data
    model, _ = build_segmentation_model(cfg)
    weights = {k[len("_module."):] if k.startswith("_module.") else k: v
               for k, v in state["module_state_dict"].items()}
    model.load_state_dict(weights)
    device = resolve_device(args.device)
    split_kw = {**cfg.dataset.val, "split": args.split}
    try:
        dataset = build_dataset(cfg.dataset.name, cfg.dataset.root, **split_kw)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise UsageError(f"data: {exc}") from None
    result = evaluate(model.to(device), dataset, cfg.model.num_classes, device,
                      max_images=args.max_images)
    names = list(getattr(dataset, "class_names", [])) or [str(i) for i in
                                                          range(cfg.model.num_classes)]
    if args.json:
        print(json.dumps({**result, "class_names": names}))
        return 0
    print(f"images {result['num_images']}, pixel accuracy {result['pixel_accuracy']:.4f}, "
          f"mIoU {result['miou']:.4f}")
    for name, iou in zip(names, result["iou"]):
        print(f"  {name:>14}: {'absent' if math.isnan(iou) else f'{iou:.4f}'}")
    return 0


def _run_dirs(paths):
    from patchdp_opacus.segmentation.train import FINAL_JSON

    found = []
    for p in map(Path, paths):
        if (p / FINAL_JSON).is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(f.parent for f in p.rglob(FINAL_JSON)))
        else:
            raise UsageError(f"run folder {p} does not exist")
    if not found:
        raise UsageError(f"no {FINAL_JSON} found under {' '.join(paths)}; run 'patchdp train' first")
    return found


def cmd_plot(args) -> int:
    from patchdp_opacus.commands._plot import check_out_path, new_figure, save
    from patchdp_opacus.segmentation.train import FINAL_JSON

    out = check_out_path(args.out)
    points = aggregate_runs(json.loads((d / FINAL_JSON).read_text()) for d in _run_dirs(args.runs))
    fig, ax = new_figure("mIoU vs privacy budget (mean ± std over seeds)",
                         "target epsilon (nats)", "mIoU")
    for level, label in (("patch", "patch-level accounting"), ("record", "record-level (DP-SGD)")):
        rows = [r for r in points if r["accounting"] == level]
        if rows:
            ax.errorbar([r["epsilon"] for r in rows], [r["miou_mean"] for r in rows],
                        yerr=[r["miou_std"] for r in rows], marker="o", capsize=3, label=label)
    save(fig, out)
    if args.json:
        print(json.dumps(points))
    else:
        print(f"wrote {out} ({len(points)} points)")
    return 0


def aggregate_runs(finals) -> list[dict]:
    """Group final metrics by (accounting, target epsilon): mean and std of mIoU over seeds."""
    import numpy as np

    groups: dict = {}
    for f in finals:
        if f.get("target_epsilon") is None:
            continue
        groups.setdefault((f["accounting"], float(f["target_epsilon"])), []).append(f["miou"])
    return [{"accounting": a, "epsilon": e, "miou_mean": float(np.mean(v)),
             "miou_std": float(np.std(v)), "seeds": len(v)}
            for (a, e), v in sorted(groups.items())]
