"""Private segmentation training with patch-level accounting: a plain, readable loop.

One function, :func:`train`, does what ``patchdp train`` does:

1. build the full-resolution train/val data sets, the model (BatchNorm replaced or frozen) and
   SGD;
2. hand a plain ``DataLoader`` (no crop in it) to :class:`patchdp_opacus.PrivacyEngine`, which
   returns the crop-aware fixed-size-batch loader and calibrates the noise for the target
   epsilon with the chosen accounting (``patch`` or the ``record`` baseline: same training,
   different claim);
3. train with ``BatchMemoryManager`` (one accountant step per logical batch), evaluate mIoU
   every ``eval_every`` epochs on full-resolution validation images, checkpoint every epoch and
   resume from the last checkpoint;
4. stop cleanly before an epoch whose steps would take epsilon past the target;
5. write ``metrics.csv``, ``privacy_report.json`` / ``.txt``, ``final_metrics.json`` and a
   prediction PNG into the output folder.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from patchdp_opacus.plugin.engine import PrivacyEngine
from patchdp_opacus.privacy import PatchDPSGD, accounting, region_from_dict
from patchdp_opacus.segmentation.config import ExperimentConfig, loader_geometry
from patchdp_opacus.segmentation.datasets import build_dataset
from patchdp_opacus.segmentation.losses import PerImageCrossEntropy
from patchdp_opacus.segmentation.metrics import ConfusionMatrix
from patchdp_opacus.segmentation.models import build_model

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
REPORT_JSON = "privacy_report.json"
REPORT_TXT = "privacy_report.txt"
METRICS_CSV = "metrics.csv"
FINAL_JSON = "final_metrics.json"
PREDICTION_PNG = "prediction.png"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device_name: str):
    """torchrun support: when ``WORLD_SIZE > 1`` join the process group (NCCL on CUDA, gloo on
    CPU) and pin this rank to ``cuda:LOCAL_RANK``.  Returns ``(device, rank, world_size)``."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return resolve_device(device_name), 0, 1
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def build_datasets(cfg: ExperimentConfig):
    d = cfg.dataset
    train_set = build_dataset(d.name, d.root, **{"split": "train", **d.train})
    val_set = build_dataset(d.name, d.root, **{"split": "val", **d.val})
    if len(train_set) == 0:
        raise ValueError(f"training split of dataset {d.name!r} at {d.root} is empty")
    return train_set, val_set


def build_segmentation_model(cfg: ExperimentConfig):
    m = cfg.model
    return build_model(m.arch, encoder_name=m.encoder_name, encoder_weights=m.encoder_weights,
                       num_classes=m.num_classes, output_stride=m.output_stride, norm=m.norm,
                       aspp_rates=tuple(m.aspp_rates), return_report=True,
                       check_input_size=tuple(cfg.privacy.crop), **m.extra)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, num_classes: int, device: torch.device, *,
             batch_size: int = 1, max_images: Optional[int] = None,
             progress: Optional[Callable] = None) -> dict:
    """Pixel accuracy, per-class IoU and mIoU on full-resolution images of ``dataset``."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=getattr(dataset, "ignore_index", 255))
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    for images, masks in (progress(loader) if progress else loader):
        logits = model(images.to(device))
        cm.update(logits.argmax(1), masks.to(device))
    model.train(was_training)
    out = cm.compute()
    out["num_images"] = n
    # Baseline the demo must beat: predict the most frequent ground-truth class everywhere.
    mat = cm.value().double()
    totals = mat.sum(1)
    present = int((totals > 0).sum())
    out["majority_class_miou"] = float(totals.max() / totals.sum() / max(present, 1)) \
        if totals.sum() > 0 else float("nan")
    return out


def _epsilon_after(history, p: float, extra_steps: int, z: float, q: float, delta: float,
                   level_p: float) -> float:
    runs = [PatchDPSGD(hz, hq, level_p, hs) for hz, hq, hs in history]
    runs.append(PatchDPSGD(z, q, level_p, extra_steps))
    return accounting.epsilon(runs, delta)


def _write_report(out: Path, engine: PrivacyEngine, cfg: ExperimentConfig, delta: float,
                  extra: dict) -> dict:
    report = engine.privacy_report(delta)
    report.update(extra)
    report["target"] = getattr(engine, "target", None)
    report["config_name"] = cfg.name
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str))
    geo = report.get("geometry", {})
    spec = getattr(engine.accountant, "spec", None)
    lines = [
        f"patch-level DP-SGD privacy report ({cfg.name})",
        f"relation: {report['relation']}; sampling: {report['sampling']}",
        f"{spec.describe_geometry() if spec is not None else 'no crop geometry'}; image sizes "
        f"{geo.get('image_sizes')}; private region {geo.get('region')}",
        f"p = {geo.get('inclusion_fraction')} = {geo.get('inclusion_probability')}",
        f"N = {report.get('dataset_size')}, B = {report.get('batch_size')}, "
        f"q = {report.get('sample_rate')}, w = q*p = {report.get('effective_sample_rate')}",
        f"noise multiplier z = {report['noise_multiplier']} (std = z*C), C = "
        f"{report['max_grad_norm']}, steps = {report['steps']}, delta = {delta}",
        f"epsilon (patch level)  = {report['epsilon_patch']}",
        f"epsilon (record level) = {report['epsilon_record']}",
    ]
    if geo.get("unchecked_transforms"):
        lines.append(f"UNCHECKED transforms accepted by override: {geo['unchecked_transforms']}")
    (out / REPORT_TXT).write_text("\n".join(lines) + "\n")
    return report


def train(cfg: ExperimentConfig, output_dir: str | Path, *, resume: bool = True,
          progress: Optional[Callable] = None) -> dict:
    """Run (or resume) one private training run; returns the final metrics and report.

    ``progress``: optional wrapper for iterables (e.g. ``tqdm``) used for the batch loop."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t, pcfg = cfg.training, cfg.privacy
    device, rank, world = init_distributed(t.device)
    is_main = rank == 0
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    train_set, val_set = build_datasets(cfg)
    model, compat = build_segmentation_model(cfg)
    logger.info("model compatibility changes: %s", compat)
    model = model.to(device)
    if world > 1:  # the global batch B is split across ranks by the crop-aware loader
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        model = DPDDP(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer != "sgd":
        raise ValueError(f"training.optimizer {t.optimizer!r} is not supported; use 'sgd'")
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    base_loader = DataLoader(train_set, batch_size=t.batch_size, num_workers=t.num_workers,
                             pin_memory=device.type == "cuda")
    n = len(train_set)
    delta = pcfg.delta if pcfg.delta is not None else 1.0 / n
    criterion = PerImageCrossEntropy(reduction="mean")
    engine = PrivacyEngine(secure_mode=pcfg.secure_sampling)
    common = dict(module=model, optimizer=optimizer, data_loader=base_loader,
                  criterion=criterion, max_grad_norm=pcfg.max_grad_norm,
                  crop=loader_geometry(pcfg),
                  private_region=region_from_dict(pcfg.private_region),
                  seed=t.seed, grad_sample_mode=t.grad_sample_mode)
    if t.fast_options:
        common["fast_options"] = dict(t.fast_options)
    if pcfg.noise_multiplier is not None:
        made = engine.make_private(noise_multiplier=pcfg.noise_multiplier, **common)
    else:
        made = engine.make_private_with_epsilon(target_epsilon=pcfg.epsilon, target_delta=delta,
                                                epochs=t.epochs, level=pcfg.accounting, **common)
    if len(made) == 4:
        model, optimizer, criterion, loader = made
    else:
        model, optimizer, loader = made
    z, q, p = engine.noise_multiplier, loader.sample_rate, loader.inclusion_probability
    level_p = p if pcfg.accounting == "patch" else 1.0
    budget = pcfg.epsilon

    start_epoch, history_rows = 0, []
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        state = engine.load_checkpoint(path=ckpt, module=model, optimizer=optimizer)
        start_epoch = int(state["epoch"]) + 1
        history_rows = list(state.get("metrics_rows", []))
        if "torch_rng_state" in state:  # Opacus draws its noise from torch's global generator
            torch.set_rng_state(state["torch_rng_state"])
        logger.info("resumed from %s at epoch %d (%d steps accounted)", ckpt, start_epoch,
                    len(engine.accountant))

    num_classes = cfg.model.num_classes
    stopped_reason = None
    last_eval = None
    for epoch in range(start_epoch, t.epochs):
        if budget is not None:
            eps_next = _epsilon_after(engine.accountant.history, p, len(loader), z, q, delta,
                                      level_p)
            if eps_next > budget * (1 + 1e-9):
                stopped_reason = (f"stopped before epoch {epoch}: its {len(loader)} steps would "
                                  f"take {pcfg.accounting}-level epsilon to {eps_next:.4g} > "
                                  f"budget {budget}")
                logger.warning(stopped_reason)
                break
        model.train()
        t0, losses = time.time(), []
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=t.max_physical_batch_size,
                                optimizer=optimizer) as mem_loader:
            it = progress(mem_loader) if progress else mem_loader
            for images, masks in it:
                images, masks = images.to(device), masks.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), masks)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                # the accountant only grows when a logical step completes (last chunk)
                if t.max_steps is not None and len(engine.accountant) >= t.max_steps:
                    break
        if world > 1:
            torch.distributed.barrier()
        row = {"epoch": epoch, "steps": len(engine.accountant),
               "train_loss": float(np.mean(losses)) if losses else math.nan,
               "epsilon_patch": engine.get_epsilon(delta),
               "epsilon_record": engine.get_epsilon(delta, level="record"),
               "seconds": round(time.time() - t0, 2), "miou": "", "pixel_accuracy": ""}
        if is_main and ((epoch + 1) % max(t.eval_every, 1) == 0 or epoch + 1 == t.epochs):
            last_eval = evaluate(model, val_set, num_classes, device,
                                 batch_size=t.eval_batch_size, max_images=t.max_eval_images)
            row.update(miou=last_eval["miou"], pixel_accuracy=last_eval["pixel_accuracy"])
        history_rows.append(row)
        if is_main:
            _write_csv(out / METRICS_CSV, history_rows)
            _log_tensorboard(out, row)
            engine.save_checkpoint(path=ckpt, module=model, optimizer=optimizer,
                                   checkpoint_dict={"epoch": epoch, "metrics_rows": history_rows,
                                                    "config": cfg.to_dict(),
                                                    "torch_rng_state": torch.get_rng_state()})
        if world > 1:
            torch.distributed.barrier()
        logger.info("epoch %d: loss %.4f, eps patch %.4g / record %.4g, mIoU %s", epoch,
                    row["train_loss"], row["epsilon_patch"], row["epsilon_record"], row["miou"])
        if t.max_steps is not None and len(engine.accountant) >= t.max_steps:
            stopped_reason = f"stopped after max_steps={t.max_steps} logical steps"
            break

    if not is_main:
        return {"rank": rank, "steps": len(engine.accountant)}
    if last_eval is None:
        last_eval = evaluate(model, val_set, num_classes, device, batch_size=t.eval_batch_size,
                             max_images=t.max_eval_images)
    report = _write_report(out, engine, cfg, delta, {
        "accounting_used_for_noise": pcfg.accounting, "stopped": stopped_reason,
        "model_changes": str(compat), "device": str(device)})
    final = {"miou": last_eval["miou"], "pixel_accuracy": last_eval["pixel_accuracy"],
             "iou": last_eval["iou"], "majority_class_miou": last_eval["majority_class_miou"],
             "class_names": list(getattr(val_set, "class_names", [])),
             "epsilon_patch": report["epsilon_patch"], "epsilon_record": report["epsilon_record"],
             "target_epsilon": budget, "accounting": pcfg.accounting, "delta": delta,
             "steps": report["steps"], "noise_multiplier": z, "seed": t.seed,
             "stopped": stopped_reason}
    (out / FINAL_JSON).write_text(json.dumps(final, indent=2))
    save_prediction_png(model, val_set, device, out / PREDICTION_PNG)
    return final


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _log_tensorboard(out: Path, row: dict) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return
    with SummaryWriter(log_dir=str(out / "tensorboard")) as w:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch":
                w.add_scalar(k, v, row["steps"])


CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class ids (H, W) → RGB with the Cityscapes palette; ignored / unknown ids black."""
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    valid = (mask >= 0) & (mask < len(CITYSCAPES_PALETTE))
    out[valid] = CITYSCAPES_PALETTE[mask[valid]]
    return out


@torch.no_grad()
def save_prediction_png(model, dataset, device, path: Path, index: int = 0) -> None:
    """Image | ground truth | prediction, side by side, as one PNG."""
    from PIL import Image

    if len(dataset) == 0:
        return
    was_training = model.training
    model.eval()
    image, mask = dataset[index]
    pred = model(image.unsqueeze(0).to(device)).argmax(1)[0].cpu().numpy()
    model.train(was_training)
    img = image.permute(1, 2, 0).numpy().astype(np.uint8)
    panel = np.concatenate([img, colorize(mask.numpy()), colorize(pred)], axis=1)
    Image.fromarray(panel).save(path)
