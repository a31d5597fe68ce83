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
5. hand every number to :class:`~patchdp_opacus.segmentation.outputs.RunOutputs`, which writes
   the run folder.

Nothing computed from private training batches leaves the loop un-noised unless
``training.log_train_loss`` asks for the loss (then marked "not covered by epsilon").  The seed
initialises the model; the noise and the batches/crops come from OS entropy unless
``privacy.reproducible_noise`` / ``privacy.reproducible_sampling`` derive them from the seed
(for debugging: whoever knows the seed can then subtract the noise).  The checkpoint is a
private artefact and holds no noise RNG state unless the noise is reproducible anyway.
"""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from patchdp_opacus.plugin.engine import PrivacyEngine
from patchdp_opacus.privacy import PatchDPSGD, PatchPrivacySpec, accounting, region_from_dict
from patchdp_opacus.segmentation import outputs
from patchdp_opacus.segmentation.augment import build_transforms
from patchdp_opacus.segmentation.config import ConfigError, ExperimentConfig, loader_geometry
from patchdp_opacus.segmentation.datasets import build_dataset
from patchdp_opacus.segmentation.losses import PerImageCrossEntropy
from patchdp_opacus.segmentation.metrics import ConfusionMatrix
from patchdp_opacus.segmentation.models import build_model
from patchdp_opacus.segmentation.outputs import FINAL_JSON, LOSS_COLUMN  # noqa: F401

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a device this
    machine does not have raises a ``ConfigError`` naming ``training.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("training.device", f"unknown device {name!r}; use auto, cpu, cuda or "
                                             f"cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("training.device", "no CUDA GPU is visible on this machine "
                                                 "(torch.cuda.is_available() is False); use "
                                                 "cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError("training.device", f"only {count} CUDA GPU(s) are visible, {name} is not one of them")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("training.device", "MPS is not available; use cpu or auto")
    return device


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
    """Train and val data sets; a bad dataset argument raises a ``ConfigError`` naming
    ``dataset.train`` / ``dataset.val`` (a missing folder raises ``FileNotFoundError``)."""
    d = cfg.dataset
    sets = []
    for split in ("train", "val"):
        extra = {"transform": build_transforms(d.transforms)} if split == "train" \
            and d.transforms else {}
        try:
            sets.append(build_dataset(d.name, d.root, **{"split": split, **getattr(d, split),
                                                         **extra}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dataset.{split}", str(exc)) from None
    train_set, val_set = sets
    if len(train_set) == 0:
        raise ConfigError("dataset.train", f"the training split of dataset {d.name!r} at "
                                           f"{d.root} is empty")
    sizes = sorted(tuple(s) for s in getattr(train_set, "image_sizes", ()))
    if sizes:  # before the model is built: the geometry fits every training image
        try:
            PatchPrivacySpec(loader_geometry(cfg.privacy),
                             region_from_dict(cfg.privacy.private_region), sizes)
        except ValueError as exc:
            key = "privacy.transform" if cfg.privacy.transform else "privacy.crop"
            raise ConfigError(key, f"{exc} (training image sizes {sizes})") from None
    return train_set, val_set


def build_segmentation_model(cfg: ExperimentConfig):
    m = cfg.model
    try:
        return build_model(m.arch, encoder_name=m.encoder_name,
                           encoder_weights=m.encoder_weights, num_classes=m.num_classes,
                           output_stride=m.output_stride, norm=m.norm,
                           aspp_rates=tuple(m.aspp_rates), return_report=True,
                           check_input_size=tuple(cfg.privacy.crop), **m.extra)
    except TypeError as exc:  # an unknown model.extra argument
        if not m.extra:
            raise
        raise ConfigError("model.extra", str(exc)) from None


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


def _model_seed(cfg: ExperimentConfig, epoch: int) -> Optional[int]:
    """Seed of torch's global RNG (dropout, anything else the model draws) for ``epoch``:
    derived from the config seed when the noise is reproducible anyway (a resumed run then
    equals an uninterrupted one), else None (OS entropy: Opacus draws its noise from that RNG
    when no generator is given, so it must not be predictable)."""
    if not cfg.privacy.reproducible_noise:
        return None
    return int(np.random.SeedSequence([cfg.training.seed, epoch]).generate_state(1)[0])


def loader_arguments(cfg: ExperimentConfig) -> dict:
    """What ``make_private`` (and ``CropDPDataLoader.from_data_loader``) needs to build the
    crop-aware loader of ``cfg``: the loader geometry, the private region, the post-crop stage
    and the sampling seed (the config seed only when sampling is reproducible; else None:
    batches and crops from OS entropy, shared by rank 0 under torchrun)."""
    pcfg = cfg.privacy
    return dict(crop=loader_geometry(pcfg), private_region=region_from_dict(pcfg.private_region),
                post_crop_transform=build_transforms(pcfg.post_crop_transforms),
                seed=cfg.training.seed if pcfg.reproducible_sampling else None)


class Progress:
    """What :func:`train` reports while it runs (the CLI draws progress bars from it).

    ``start_epoch(epoch, epochs, steps)`` (1-based epoch, logical steps in it),
    ``step(done)`` after each logical step (logical steps done in this epoch) and
    ``end_epoch(row)`` with the epoch's metrics row.  Nothing in them depends on private data
    beyond what ``metrics.csv`` holds."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, done: int) -> None: ...

    def end_epoch(self, row: dict) -> None: ...


def train(cfg: ExperimentConfig, output_dir: str | Path, *, resume: bool = True,
          progress: Optional[Progress] = None, overrides: Sequence[str] = ()) -> dict:
    """Run (or resume) one private training run; returns the final metrics.

    ``progress``: a :class:`Progress` (e.g. the CLI's bars); ``overrides``: the command-line
    overrides, recorded in the run's config.yaml and privacy report.  The output folder is
    created at the first write."""
    out = outputs.RunOutputs(output_dir, log_train_loss=cfg.training.log_train_loss)
    progress = progress or Progress()
    t, pcfg = cfg.training, cfg.privacy
    device, rank, world = init_distributed(t.device)
    is_main = rank == 0
    started = time.time()
    torch.manual_seed(t.seed)  # model initialisation
    np.random.seed(t.seed)

    train_set, val_set = build_datasets(cfg)
    model, compat = build_segmentation_model(cfg)
    torch.seed()  # nothing after the initialisation may be predictable from the config seed
    model = model.to(device)
    if world > 1:  # the global batch B is split across ranks by the crop-aware loader
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        model = DPDDP(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    base_loader = DataLoader(train_set, batch_size=t.batch_size, num_workers=t.num_workers,
                             pin_memory=device.type == "cuda")
    n = len(train_set)
    delta = pcfg.delta if pcfg.delta is not None else 1.0 / n
    criterion = PerImageCrossEntropy(reduction="mean")
    engine = PrivacyEngine(secure_mode=pcfg.secure_sampling)
    noise_generator = torch.Generator(device=device).manual_seed(t.seed) \
        if pcfg.reproducible_noise else None
    common = dict(module=model, optimizer=optimizer, data_loader=base_loader,
                  criterion=criterion, max_grad_norm=pcfg.max_grad_norm,
                  noise_generator=noise_generator, grad_sample_mode=t.grad_sample_mode,
                  **loader_arguments(cfg))
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

    start_epoch, elapsed_before = 0, 0.0
    ckpt = Path(output_dir) / CHECKPOINT
    if resume and ckpt.exists():
        state = engine.load_checkpoint(path=ckpt, module=model, optimizer=optimizer)
        start_epoch = int(state["epoch"]) + 1
        elapsed_before = out.restore(state.get("metrics_rows", []))
        if noise_generator is not None and "noise_generator_state" in state:
            noise_generator.set_state(state["noise_generator_state"])
        logger.info("resumed from %s at epoch %d (%d steps accounted)", ckpt, start_epoch + 1,
                    len(engine.accountant))
    if is_main:
        out.write_config(cfg, overrides)

    num_classes = cfg.model.num_classes
    stopped_reason = None
    last_eval = None
    for epoch in range(start_epoch, t.epochs):
        if budget is not None:
            eps_next = _epsilon_after(engine.accountant.history, p, len(loader), z, q, delta,
                                      level_p)
            if eps_next > budget * (1 + 1e-9):
                stopped_reason = (f"stopped before epoch {epoch + 1}: its {len(loader)} steps "
                                  f"would take {pcfg.accounting}-level epsilon to "
                                  f"{eps_next:.4g} > budget {budget}")
                logger.warning(stopped_reason)
                break
        seed = _model_seed(cfg, epoch)
        if seed is None:
            torch.seed()  # OS entropy
        else:
            torch.manual_seed(seed)
        model.train()
        t0, losses, first_step = time.time(), [], len(engine.accountant)
        progress.start_epoch(epoch + 1, t.epochs, len(loader))
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=t.max_physical_batch_size,
                                optimizer=optimizer) as mem_loader:
            for images, masks in mem_loader:
                images, masks = images.to(device), masks.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), masks)
                loss.backward()
                optimizer.step()
                if t.log_train_loss:  # opt-in: an un-noised statistic of private batches
                    losses.append(loss.item())
                # the accountant only grows when a logical step completes (last chunk)
                progress.step(len(engine.accountant) - first_step)
                if t.max_steps is not None and len(engine.accountant) >= t.max_steps:
                    break
        if world > 1:
            torch.distributed.barrier()
        row = {"epoch": epoch + 1, "steps": len(engine.accountant),
               "lr": optimizer.param_groups[0]["lr"],
               "epsilon_patch": engine.get_epsilon(delta),
               "epsilon_record": engine.get_epsilon(delta, level="record"),
               "miou": None, "pixel_accuracy": None}
        if is_main and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
            last_eval = evaluate(model, val_set, num_classes, device,
                                 batch_size=t.eval_batch_size, max_images=t.max_eval_images)
            row.update(miou=last_eval["miou"], pixel_accuracy=last_eval["pixel_accuracy"])
        row.update(epoch_seconds=round(time.time() - t0, 2),
                   elapsed_seconds=round(elapsed_before + time.time() - started, 2),
                   time=datetime.datetime.now().isoformat(timespec="seconds"))
        if t.log_train_loss:
            row[LOSS_COLUMN] = float(np.mean(losses)) if losses else None
        if is_main:
            out.add_epoch(row)
            extra = {"epoch": epoch, "metrics_rows": out.rows, "config": cfg.to_dict()}
            if noise_generator is not None:  # public anyway: the noise is reproducible
                extra["noise_generator_state"] = noise_generator.get_state()
            engine.save_checkpoint(path=ckpt, module=model, optimizer=optimizer,
                                   checkpoint_dict=extra)
        if world > 1:
            torch.distributed.barrier()
        progress.end_epoch(row)
        logger.info("epoch %d/%d: %d steps, epsilon patch %s / record %s, lr %g, mIoU %s%s",
                    epoch + 1, t.epochs, row["steps"], outputs.fmt(row["epsilon_patch"]),
                    outputs.fmt(row["epsilon_record"]), row["lr"], outputs.fmt(row["miou"]),
                    f", train loss {outputs.fmt(row[LOSS_COLUMN])} (not covered by epsilon)"
                    if t.log_train_loss else "")
        if t.max_steps is not None and len(engine.accountant) >= t.max_steps:
            stopped_reason = f"stopped after max_steps={t.max_steps} logical steps"
            break
    out.close()

    if not is_main:
        return {"rank": rank, "steps": len(engine.accountant)}
    if last_eval is None:
        last_eval = evaluate(model, val_set, num_classes, device, batch_size=t.eval_batch_size,
                             max_images=t.max_eval_images)
    report = out.write_report(outputs.run_report(
        {**engine.privacy_report(delta), "target": engine.target}, config_name=cfg.name,
        accounting=pcfg.accounting, stopped=stopped_reason, model_changes=compat.as_dict(),
        device=str(device), reproducible_noise=pcfg.reproducible_noise,
        reproducible_sampling=pcfg.reproducible_sampling,
        secure_sampling=pcfg.secure_sampling, log_train_loss=t.log_train_loss,
        overrides=overrides))
    names = outputs.class_names(val_set, num_classes)
    final = {"miou": last_eval["miou"], "pixel_accuracy": last_eval["pixel_accuracy"],
             "iou": outputs.iou_by_class(last_eval["iou"], names),
             "majority_class_miou": last_eval["majority_class_miou"],
             "epsilon_patch": report["epsilon_patch"], "epsilon_record": report["epsilon_record"],
             "target_epsilon": budget, "accounting": pcfg.accounting, "delta": delta,
             "steps": report["steps"], "noise_multiplier": report["noise_multiplier"],
             "history_segments": report["history_segments"], "seed": t.seed,
             "stopped": stopped_reason, "output": str(output_dir)}
    out.write_final(final)
    out.write_prediction(model, val_set, device, names)
    return outputs.json_safe(final)
