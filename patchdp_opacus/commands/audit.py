"""``patchdp audit``: the neighbour-pair audit of a training config's data pipeline.

Builds the training data set and the crop-aware loader exactly as ``patchdp train`` does
(pre-crop ``dataset.transforms``, the loader geometry, ``privacy.post_crop_transforms``),
reports the transform inspection's verdict, runs :func:`patchdp_opacus.audit.audit_loader`
(or, where the inspection refuses the pipeline, :func:`~patchdp_opacus.audit.audit_pipeline`
to show what the refusal is about), and checks for a few training steps that the accountant
counts one step per logical batch.  Exit code 0 for PASS, 1 for FAIL, 2 for bad input.
"""

from __future__ import annotations

from patchdp_opacus.commands import HelpFormatter, UsageError


def register(subparsers) -> None:
    from patchdp_opacus.commands.training import add_config_arguments

    p = subparsers.add_parser(
        "audit", formatter_class=HelpFormatter,
        help="audit a training config's data pipeline with neighbour pairs",
        description="Push pairs of images that differ only inside the private region through "
                    "the config's real training pipeline (dataset transforms, the loader's "
                    "crop, the post-crop stage, the collate) with the same random draws and "
                    "count how often any output differs; also check the crop-origin histogram "
                    "and that the accountant counts one step per logical batch. Exit code 1 "
                    "when the audit fails.")
    add_config_arguments(p)
    p.add_argument("--trials", type=int, default=1000, help="neighbour pairs")
    p.add_argument("--confidence", type=float, default=0.999,
                   help="confidence of the Clopper-Pearson interval")
    p.add_argument("--index", type=int, default=0, help="the record whose image is replaced")
    p.add_argument("--train-steps", type=int, default=2,
                   help="logical training steps for the accountant check (0: skip)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_audit, epsilon=None, noise_multiplier=None, accounting=None,
                   sigma_aug=None,
                   seed=None, epochs=None, max_steps=None, device=None)


def cmd_audit(args) -> int:
    if args.trials < 1:
        raise UsageError(f"--trials {args.trials}: must be at least 1")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence {args.confidence}: must lie strictly between 0 and 1")
    from patchdp_opacus.audit import AuditError
    from patchdp_opacus.commands.training import _config_error, _load_cfg
    from patchdp_opacus.segmentation.config import ConfigError

    cfg, items = _load_cfg(args)
    try:
        result = run_audit(cfg, trials=args.trials, confidence=args.confidence,
                           index=args.index, train_steps=args.train_steps)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UsageError(f"data: {exc} (set dataset.root in --config or --data-root)") from None
    except ConfigError as exc:
        raise _config_error(args, exc, items) from None
    except AuditError as exc:
        raise UsageError(f"audit: {exc}") from None
    if args.json:
        import json

        print(json.dumps(result, indent=2, default=str))
    else:
        print(result["table"])
    return 0 if result["verdict"] == "pass" else 1


def run_audit(cfg, *, trials: int, confidence: float, index: int, train_steps: int) -> dict:
    """The audit of one config (see the module docstring); a JSON-able dict with a printable
    ``table`` and ``verdict`` ("pass" / "fail")."""
    from torch.utils.data import DataLoader

    from patchdp_opacus.audit import audit_loader, audit_pipeline
    from patchdp_opacus.plugin.loader import CropDPDataLoader
    from patchdp_opacus.plugin.transforms import TransformNotAllowedError
    from patchdp_opacus.privacy import PatchPrivacySpec
    from patchdp_opacus.app.loop import build_datasets, loader_arguments

    train_set, _ = build_datasets(cfg)
    args = loader_arguments(cfg, train_set)
    batch = min(cfg.training.batch_size, len(train_set))
    refusal, loader = None, None
    try:
        loader = CropDPDataLoader.from_data_loader(DataLoader(train_set, batch_size=batch),
                                                   **args)
        report = audit_loader(loader, trials=trials, confidence=confidence, index=index)
    except TransformNotAllowedError as exc:
        refusal = str(exc)
        spec = PatchPrivacySpec(args["crop"], args["private_region"],
                                sorted(tuple(s) for s in train_set.image_sizes),
                                augmentation=args["gaussian_augmentation"])
        report = audit_pipeline(train_set, spec, post_crop_transform=args["post_crop_transform"],
                                batch_size=batch, trials=trials, confidence=confidence,
                                index=index)
    steps = None
    if loader is not None and train_steps > 0:
        steps = _training_steps(cfg, train_set, train_steps)
    passed = report.passed and refusal is None and (steps is None or steps["passed"])
    lines = [f"neighbour-pair audit of {cfg.name} ({report.trials} pairs, record {index})",
             report.table()]
    if refusal:
        lines.append(f"transform inspection: REFUSED -- {refusal}")
    else:
        lines.append("transform inspection: accepted"
                     + (f" (unchecked by override: {list(loader.unchecked_transforms)})"
                        if loader.unchecked_transforms else ""))
    if steps is not None:
        lines.append(f"training steps: {steps['noisy_steps']} noisy steps, "
                     f"{steps['accountant_steps']} accountant steps, "
                     f"{steps['logical_batches']} logical batches drawn -> "
                     f"{'ok' if steps['passed'] else 'MISMATCH'}")
    lines.append(f"overall verdict: {'PASS' if passed else 'FAIL'}")
    return {**report.as_dict(), "inspection_refusal": refusal, "training_steps": steps,
            "verdict": "pass" if passed else "fail", "table": "\n".join(lines)}


def _training_steps(cfg, train_set, steps: int) -> dict:
    """A few logical steps of the config's model through the engine, on the CPU."""
    import torch
    from torch.utils.data import DataLoader

    from patchdp_opacus import PrivacyEngine
    from patchdp_opacus.app.loop import input_size, loader_arguments
    from patchdp_opacus.app.tasks import task_of
    from patchdp_opacus.audit import audit_training_steps

    task = task_of(cfg)
    model, _ = task.build_model(cfg, input_size(cfg, train_set))
    t = cfg.training
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=t.lr)
    engine = PrivacyEngine()
    criterion = task.criterion()
    made = engine.make_private(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(train_set, batch_size=min(t.batch_size, len(train_set))),
        criterion=criterion, noise_multiplier=1.0, max_grad_norm=cfg.privacy.max_grad_norm,
        grad_sample_mode=t.grad_sample_mode, **loader_arguments(cfg, train_set),
        **({"fast_options": dict(t.fast_options)} if t.fast_options else {}))
    model, optimizer, loader = made[0], made[1], made[-1]
    loss = made[2] if len(made) == 4 else criterion
    return audit_training_steps(engine, model, optimizer, loader,
                                lambda m, batch: loss(m(batch[0]), batch[1]), steps=steps,
                                max_physical_batch_size=t.max_physical_batch_size)
