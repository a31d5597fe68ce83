"""The training loop of ``patchdp train``, one for both tasks: plain and readable.

:func:`train` does, for a segmentation or a classification config (what differs is the
:class:`~patchdp_opacus.app.tasks.Task`: data sets, model, loss, evaluation):

1. build the full-resolution train/val data sets, the model (BatchNorm replaced, frozen or
   removed) and SGD with momentum (and, with ``training.scheduler: cosine``, a cosine decay
   of the learning rate over the epochs, one step per epoch);
2. hand a plain ``DataLoader`` (no crop in it) to :class:`patchdp_opacus.PrivacyEngine`, which
   returns the crop-aware fixed-size-batch loader and calibrates the noise for the target
   epsilon with the chosen accounting (``patch``, the ``record`` baseline, or the
   ``gaussian_augmentation`` baseline, whose noise the loader then adds to every sample: the
   same training algorithm, different claims) -- or, with ``privacy.accounting: none``, plain
   SGD on the loader's uniform crops (or on whole images without ``privacy.crop``), no claim;
3. train with ``BatchMemoryManager`` (one accountant step per logical batch), evaluate every
   ``eval_every`` epochs on whole validation images, checkpoint every epoch and resume from
   the last checkpoint (refused under another accounting);
4. stop cleanly before an epoch whose steps would take epsilon past the target;
5. hand every number to :class:`~patchdp_opacus.app.outputs.RunOutputs`, which writes the run
   folder.

Nothing computed from private training batches leaves the loop un-noised unless
``training.log_train_loss`` asks for the loss (then marked "not covered by epsilon").  The seed
initialises the model; the gradient noise, the augmentation noise and the batches/crops come
from OS entropy unless ``privacy.reproducible_noise`` / ``privacy.reproducible_sampling``
derive them from the seed (for debugging: whoever knows the seed can then subtract the noise).
The checkpoint is a private artefact and holds no noise RNG state unless the noise is
reproducible anyway.
"""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset

from patchdp_opacus.app import outputs
from patchdp_opacus.app.config import (
    ConfigError,
    ExperimentConfig,
    evaluation_geometry,
    loader_geometry,
)
from patchdp_opacus.app.outputs import LOSS_COLUMN, NON_PRIVATE
from patchdp_opacus.app.tasks import Task, task_of
from patchdp_opacus.plugin.engine import PrivacyEngine
from patchdp_opacus.plugin.loader import shared_records
from patchdp_opacus.privacy import (
    GaussianAugmentation,
    PatchDPSGD,
    PatchPrivacySpec,
    accounting,
    region_from_dict,
)
from patchdp_opacus.segmentation.augment import build_transforms

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
            raise ConfigError("training.device", f"only {count} CUDA GPU(s) are visible, {name} "
                                                 f"is not one of them")
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


def build_datasets(cfg: ExperimentConfig, task: Optional[Task] = None):
    """Train and val data sets; a bad dataset argument raises a ``ConfigError`` naming
    ``dataset.train`` / ``dataset.val`` (a missing folder raises ``FileNotFoundError``)."""
    task = task or task_of(cfg)
    d = cfg.dataset
    sets = []
    for split in ("train", "val"):
        extra = {"transform": build_transforms(d.transforms)} if split == "train" \
            and d.transforms else {}
        try:
            sets.append(task.build_dataset(d.name, d.root, **{"split": split,
                                                               **getattr(d, split), **extra}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dataset.{split}", str(exc)) from None
    train_set, val_set = sets
    if len(train_set) == 0:
        raise ConfigError("dataset.train", f"the training split of dataset {d.name!r} at "
                                           f"{d.root} is empty")
    shared = shared_records(train_set, val_set)
    if shared:  # e.g. another DTD partition, or A2D2 sessions listed from the training split
        raise ConfigError("dataset.val", f"validation images are training images ({shared}): "
                                         f"their metrics (accuracy or mIoU, per class) would be "
                                         f"statistics of the private training data, released "
                                         f"without noise. Evaluate on images outside the "
                                         f"training split (the same partition / sessions for "
                                         f"dataset.train and dataset.val)")
    sizes = sorted(tuple(s) for s in getattr(train_set, "image_sizes", ()))
    if sizes and cfg.privacy.crop is not None:  # before the model: the geometry fits them all
        try:
            PatchPrivacySpec(loader_geometry(cfg.privacy),
                             region_from_dict(cfg.privacy.private_region), sizes)
        except ValueError as exc:
            key = "privacy.transform" if cfg.privacy.transform else "privacy.crop"
            raise ConfigError(key, f"{exc} (training image sizes {sizes})") from None
    return train_set, val_set


class EvaluationView(Dataset):
    """``dataset`` with the deterministic resize of a loader-owned ``Resize`` applied to every
    sample (image and mask, the loader's kernels): what evaluation on "whole images" means when
    training resized them."""

    def __init__(self, dataset, resize):
        self.dataset, self.resize = dataset, resize
        self.class_names = getattr(dataset, "class_names", None)
        self.ignore_index = getattr(dataset, "ignore_index", 255)
        self.image_sizes = {tuple(resize.resized_size(s))
                            for s in getattr(dataset, "image_sizes", ())}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from patchdp_opacus.plugin.resample import resample_sample

        return resample_sample(self.dataset[index], self.resize, (0, 0, 0))


def evaluation_dataset(dataset, cfg: ExperimentConfig):
    """``dataset`` as evaluation sees it: whole images (resized as in training when the
    loader owns a ``resize``, see :func:`~patchdp_opacus.app.config.evaluation_geometry`)."""
    resize = evaluation_geometry(cfg.privacy)
    return dataset if resize is None else EvaluationView(dataset, resize)


def input_size(cfg: ExperimentConfig, train_set) -> tuple:
    """What the model sees in training: the crop, or the (single) image size without one."""
    if cfg.privacy.crop is not None:
        return tuple(cfg.privacy.crop)
    sizes = sorted(getattr(train_set, "image_sizes", ()))
    if len(sizes) != 1:
        raise ConfigError("privacy.crop", f"null needs images of one size, the training images "
                                          f"have {sizes[:5]}")
    return tuple(sizes[0])


def _epsilon_after(history, extra_steps: int, z: float, q: float, delta: float,
                   factor: float) -> float:
    """Epsilon at the run's level (``w = q * factor``) after ``extra_steps`` more steps."""
    runs = [PatchDPSGD(hz, hq, factor, hs) for hz, hq, hs in history]
    runs.append(PatchDPSGD(z, q, factor, extra_steps))
    return accounting.epsilon(runs, delta)


def _model_seed(cfg: ExperimentConfig, epoch: int) -> Optional[int]:
    """Seed of torch's global RNG (dropout, anything else the model draws) for ``epoch``:
    derived from the config seed when the noise is reproducible anyway (a resumed run then
    equals an uninterrupted one), else None (OS entropy: Opacus draws its noise from that RNG
    when no generator is given, so it must not be predictable)."""
    if not cfg.privacy.reproducible_noise:
        return None
    return int(np.random.SeedSequence([cfg.training.seed, epoch]).generate_state(1)[0])


def _augmentation_seed(cfg: ExperimentConfig) -> Optional[int]:
    """Seed of the Gaussian-augmentation noise: from the config seed with
    ``reproducible_noise`` (a stream of its own), else None (OS entropy)."""
    if not cfg.privacy.reproducible_noise:
        return None
    return int(np.random.SeedSequence([cfg.training.seed, 2]).generate_state(1)[0])


def loader_arguments(cfg: ExperimentConfig, train_set=None) -> dict:
    """What ``make_private`` (and ``CropDPDataLoader.from_data_loader``) needs to build the
    crop-aware loader of ``cfg``: the loader geometry, the private region, the post-crop stage,
    the sampling seed (the config seed only when sampling is reproducible; else None: batches
    and crops from OS entropy, shared by rank 0 under torchrun) and, with
    ``privacy.sigma_aug``, the Gaussian augmentation the loader adds (channels of
    ``train_set``, 3 without one: the loader checks every image) and its noise seed (from the
    config seed only with ``reproducible_noise``)."""
    pcfg = cfg.privacy
    augmentation = None if pcfg.sigma_aug is None else GaussianAugmentation(
        pcfg.sigma_aug, getattr(train_set, "channels", 3))
    return dict(crop=loader_geometry(pcfg), private_region=region_from_dict(pcfg.private_region),
                post_crop_transform=build_transforms(pcfg.post_crop_transforms),
                seed=cfg.training.seed if pcfg.reproducible_sampling else None,
                gaussian_augmentation=augmentation,
                augmentation_seed=_augmentation_seed(cfg) if augmentation else None)


class Progress:
    """What :func:`train` reports while it runs (the CLI draws progress bars from it).

    ``start_epoch(epoch, epochs, steps)`` (1-based epoch, logical steps in it),
    ``step(done)`` after each logical step (logical steps done in this epoch) and
    ``end_epoch(row)`` with the epoch's metrics row.  Nothing in them depends on private data
    beyond what ``metrics.csv`` holds."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, done: int) -> None: ...

    def end_epoch(self, row: dict) -> None: ...


def _make_private(cfg, model, optimizer, criterion, train_set, device, delta):
    """The engine and what it returns: the DP model, optimizer, criterion and crop-aware
    loader, the noise calibrated for ``privacy.accounting`` (or fixed)."""
    t, pcfg = cfg.training, cfg.privacy
    base_loader = DataLoader(train_set, batch_size=t.batch_size, num_workers=t.num_workers,
                             pin_memory=device.type == "cuda")
    engine = PrivacyEngine(secure_mode=pcfg.secure_sampling)
    common = dict(module=model, optimizer=optimizer, data_loader=base_loader,
                  criterion=criterion, max_grad_norm=pcfg.max_grad_norm,
                  grad_sample_mode=t.grad_sample_mode,
                  noise_generator=torch.Generator(device=device).manual_seed(t.seed)
                  if pcfg.reproducible_noise else None, **loader_arguments(cfg, train_set))
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
    return engine, model, optimizer, criterion, loader, common["noise_generator"]


def _nonprivate_loader(cfg, train_set):
    """``accounting: none``: the loader's uniform crops (fixed-size batches drawn afresh every
    step, as in DP runs) or, without a crop, shuffled whole images."""
    t = cfg.training
    if cfg.privacy.crop is None:
        return DataLoader(train_set, batch_size=t.batch_size, shuffle=True,
                          num_workers=t.num_workers,
                          generator=torch.Generator().manual_seed(t.seed))
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    spec = PatchPrivacySpec(loader_geometry(cfg.privacy),
                            region_from_dict(cfg.privacy.private_region),
                            sorted(train_set.image_sizes))
    return CropDPDataLoader(train_set, batch_size=t.batch_size, spec=spec, seed=t.seed,
                            num_workers=t.num_workers)


def _nonprivate_step(model, optimizer, criterion, images, targets, physical: int) -> None:
    """One SGD step on a logical batch, in chunks of ``physical`` samples (gradients of the
    chunks summed with weights ``len(chunk) / len(batch)``: the batch mean)."""
    optimizer.zero_grad(set_to_none=True)
    for x, y in zip(images.split(physical), targets.split(physical)):
        (criterion(model(x), y) * (len(x) / len(images))).backward()
    optimizer.step()


#: Settings a checkpoint must resume under, with why: the noise of its steps was calibrated
#: for the accounting it ran under, and the report describes the whole run with the current
#: noise and sampling sources (a segment whose noise or batches came from the config seed is
#: not private, and a report written from a later segment's OS-entropy setting would hide it).
RESUME_INVARIANTS: tuple[tuple[str, str, str], ...] = (
    # (privacy.<key>, why it must not change, the option that sets it back ({} = old value))
    ("accounting", "the noise of its steps was calibrated for that claim", "--accounting {}"),
    ("reproducible_noise", "the privacy report states one noise source for every step",
     "--set privacy.reproducible_noise={}"),
    ("reproducible_sampling", "the privacy report states one sampling source for every step",
     "--set privacy.reproducible_sampling={}"),
    ("secure_sampling", "the privacy report states one sampling source for every step",
     "--set privacy.secure_sampling={}"),
)


def _check_resumable(ckpt: Path, cfg: ExperimentConfig) -> None:
    """A checkpoint resumes only under the privacy settings it was trained with
    (:data:`RESUME_INVARIANTS`); another value raises a ``ConfigError`` naming the setting."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    before = (state.get("config") or {}).get("privacy") or {}
    for key, why, option in RESUME_INVARIANTS:
        was, now = before.get(key), getattr(cfg.privacy, key)
        if key in before and was != now:
            value = str(was).lower() if isinstance(was, bool) else was
            raise ConfigError(f"privacy.{key}",
                              f"the checkpoint {ckpt} was trained with {key} {was!r}, not "
                              f"{now!r} ({why}): resume it with {option.format(value)}, or "
                              f"start a new run (another --output, or --no-resume)")


def _save(path: Path, engine, model, optimizer, extra: dict) -> None:
    if engine is not None:
        engine.save_checkpoint(path=path, module=model, optimizer=optimizer,
                               checkpoint_dict=extra)
    else:
        torch.save({"module_state_dict": model.state_dict(),
                    "optimizer_state_dict": optimizer.state_dict(), **extra}, path)


def _load(path: Path, engine, model, optimizer) -> dict:
    if engine is not None:
        return engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["module_state_dict"])
    optimizer.load_state_dict(state["optimizer_state_dict"])
    return state


def train(cfg: ExperimentConfig, output_dir: str | Path, *, resume: bool = True,
          progress: Optional[Progress] = None, overrides: Sequence[str] = ()) -> dict:
    """Run (or resume) one training run; returns the final metrics.

    ``progress``: a :class:`Progress` (e.g. the CLI's bars); ``overrides``: the command-line
    overrides, recorded in the run's config.yaml and privacy report.  The output folder is
    created at the first write."""
    task = task_of(cfg)
    out = outputs.RunOutputs(output_dir, log_train_loss=cfg.training.log_train_loss)
    progress = progress or Progress()
    t, pcfg = cfg.training, cfg.privacy
    private = pcfg.accounting != "none"
    device, rank, world = init_distributed(t.device)
    if world > 1 and not private:
        raise ConfigError("privacy.accounting", "none (non-private) runs use one process; "
                                                "launch them without torchrun")
    is_main = rank == 0
    started = time.time()
    torch.manual_seed(t.seed)  # model initialisation
    np.random.seed(t.seed)

    train_set, val_set = build_datasets(cfg, task)
    model, compat = task.build_model(cfg, input_size(cfg, train_set))
    torch.seed()  # nothing after the initialisation may be predictable from the config seed
    model = model.to(device)
    if world > 1:  # the global batch B is split across ranks by the crop-aware loader
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        model = DPDDP(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    n = len(train_set)
    delta = pcfg.delta if pcfg.delta is not None else 1.0 / n
    criterion = task.criterion()
    engine = noise_generator = None
    if private:
        engine, model, optimizer, criterion, loader, noise_generator = _make_private(
            cfg, model, optimizer, criterion, train_set, device, delta)
        z, q = engine.noise_multiplier, loader.sample_rate
        factor = engine.accountant.amplification(pcfg.accounting)  # p, 1 or TV: w = q*factor
        augmented = loader.spec.augmentation is not None
    else:
        loader, augmented = _nonprivate_loader(cfg, train_set), False
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs) \
        if t.scheduler == "cosine" else None
    budget = pcfg.epsilon

    def steps_taken() -> int:
        return len(engine.accountant) if engine is not None else steps_done

    start_epoch, elapsed_before, steps_done = 0, 0.0, 0
    ckpt = Path(output_dir) / CHECKPOINT
    if resume and ckpt.exists():
        _check_resumable(ckpt, cfg)
        state = _load(ckpt, engine, model, optimizer)
        start_epoch = int(state["epoch"]) + 1
        steps_done = int(state.get("steps", 0))
        elapsed_before = out.restore(state.get("metrics_rows", []))
        if noise_generator is not None and "noise_generator_state" in state:
            noise_generator.set_state(state["noise_generator_state"])
        if scheduler is not None and "scheduler_state" in state:
            scheduler.load_state_dict(state["scheduler_state"])
        logger.info("resumed from %s at epoch %d (%d steps taken)", ckpt, start_epoch + 1,
                    steps_taken())
    if is_main:
        out.write_config(cfg, overrides)
    evaluation_set = evaluation_dataset(val_set, cfg)
    confusion = cfg.evaluation.confusion_matrix

    stopped_reason = None
    last_eval = None
    for epoch in range(start_epoch, t.epochs):
        if private and budget is not None:
            eps_next = _epsilon_after(engine.accountant.history, len(loader), z, q, delta, factor)
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
        t0, losses, first_step = time.time(), [], steps_taken()
        lr = optimizer.param_groups[0]["lr"]
        progress.start_epoch(epoch + 1, t.epochs, len(loader))
        if engine is None:  # non-private: plain SGD on the logical batches
            for images, targets in loader:
                images, targets = images.to(device), targets.to(device)
                _nonprivate_step(model, optimizer, criterion, images, targets,
                                 t.max_physical_batch_size)
                steps_done += 1
                progress.step(steps_done - first_step)
                if t.max_steps is not None and steps_done >= t.max_steps:
                    break
        else:
            with BatchMemoryManager(data_loader=loader,
                                    max_physical_batch_size=t.max_physical_batch_size,
                                    optimizer=optimizer) as mem_loader:
                for images, targets in mem_loader:
                    images, targets = images.to(device), targets.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = criterion(model(images), targets)
                    loss.backward()
                    optimizer.step()
                    if t.log_train_loss:  # opt-in: an un-noised statistic of private batches
                        losses.append(loss.item())
                    # the accountant only grows when a logical step completes (last chunk)
                    progress.step(steps_taken() - first_step)
                    if t.max_steps is not None and steps_taken() >= t.max_steps:
                        break
        if scheduler is not None:
            scheduler.step()
        if world > 1:
            torch.distributed.barrier()
        row = {"epoch": epoch + 1, "steps": steps_taken(), "lr": lr,
               "epsilon_patch": engine.get_epsilon(delta) if private else None,
               "epsilon_record": engine.get_epsilon(delta, level="record") if private else None}
        if augmented:
            row["epsilon_gaussian_augmentation"] = engine.get_epsilon(
                delta, level="gaussian_augmentation")
        row.update({name: None for name in task.metrics})
        if is_main and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
            last_eval = task.evaluate(model, evaluation_set, cfg, device,
                                      max_images=t.max_eval_images, confusion_matrix=confusion)
            row.update({name: last_eval[name] for name in task.metrics})
        row.update(epoch_seconds=round(time.time() - t0, 2),
                   elapsed_seconds=round(elapsed_before + time.time() - started, 2),
                   time=datetime.datetime.now().isoformat(timespec="seconds"))
        if t.log_train_loss:
            row[LOSS_COLUMN] = float(np.mean(losses)) if losses else None
        if is_main:
            out.add_epoch(row)
            extra = {"epoch": epoch, "steps": steps_taken(), "metrics_rows": out.rows,
                     "config": cfg.to_dict()}
            if noise_generator is not None:  # public anyway: the noise is reproducible
                extra["noise_generator_state"] = noise_generator.get_state()
            if scheduler is not None:
                extra["scheduler_state"] = scheduler.state_dict()
            _save(ckpt, engine, model, optimizer, extra)
        if world > 1:
            torch.distributed.barrier()
        progress.end_epoch(row)
        logger.info("epoch %d/%d: %d steps, epsilon patch %s / record %s%s, lr %g, %s %s%s",
                    epoch + 1, t.epochs, row["steps"], outputs.fmt(row["epsilon_patch"]),
                    outputs.fmt(row["epsilon_record"]),
                    f" / Gaussian augmentation "
                    f"{outputs.fmt(row['epsilon_gaussian_augmentation'])}" if augmented else "",
                    row["lr"], task.headline, outputs.fmt(row[task.metrics[0]]),
                    f", train loss {outputs.fmt(row[LOSS_COLUMN])} (not covered by epsilon)"
                    if t.log_train_loss else "")
        if t.max_steps is not None and steps_taken() >= t.max_steps:
            stopped_reason = f"stopped after max_steps={t.max_steps} logical steps"
            break
    out.close()

    if not is_main:
        return {"rank": rank, "steps": steps_taken()}
    if last_eval is None:
        last_eval = task.evaluate(model, evaluation_set, cfg, device,
                                  max_images=t.max_eval_images, confusion_matrix=confusion)
    if private:
        engine_report = {**engine.privacy_report(delta), "target": engine.target}
    else:
        engine_report = {"relation": NON_PRIVATE, "steps": steps_taken(), "history": [],
                         "sampling": "uniform crops drawn by the loader" if pcfg.crop
                         else "shuffled whole images"}
    report = out.write_report(outputs.run_report(
        engine_report, config_name=cfg.name, accounting=pcfg.accounting, stopped=stopped_reason,
        model_changes=compat.as_dict(), device=str(device),
        reproducible_noise=pcfg.reproducible_noise,
        reproducible_sampling=pcfg.reproducible_sampling,
        secure_sampling=pcfg.secure_sampling, log_train_loss=t.log_train_loss,
        overrides=overrides))
    final = {**task.final_metrics(last_eval, evaluation_set, cfg), "task": cfg.task,
             "split": cfg.dataset.val.get("split", "val"),
             "epsilon_patch": report.get("epsilon_patch"),
             "epsilon_record": report.get("epsilon_record")}
    if augmented:
        final.update(epsilon_gaussian_augmentation=report["epsilon_gaussian_augmentation"],
                     sigma_aug=pcfg.sigma_aug, augmentation_tv=report["augmentation_tv"])
    final.update(target_epsilon=budget, accounting=pcfg.accounting, delta=delta,
                 steps=report["steps"], noise_multiplier=report["noise_multiplier"],
                 history_segments=report["history_segments"], seed=t.seed,
                 stopped=stopped_reason, output=str(output_dir))
    out.write_final(final)
    task.write_figures(out, model, evaluation_set, device, cfg)
    return outputs.json_safe(final)
