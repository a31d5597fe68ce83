"""Second red-team round: ways in which a printed epsilon did not hold for the training that ran.

Every test asserts the *safe* behaviour (an error, or the property the printed claim needs) and
fails on the code it was written against (main at 67ba99a).  Tiny models and data, seconds
each; the two ``patchdp train`` tests take a few seconds more.
"""

import json

import pytest
import torch
import torchvision.transforms.v2 as T2
from attack_helpers import CROP, REGION, SAFE_ERRORS, SIZE, post_crop_refused
from attack_helpers import Prototypes as _Prototypes
from attack_helpers import make_private as _private
from plugin_helpers import TinySegData, TinySegNet, per_image_ce
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _moved(params, before):
    return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                                for p, b in zip(params, before))))


# --- finding 1: the loop steps the optimizer it passed to make_private -------------------------
@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_stepping_the_original_optimizer_is_not_a_zero_epsilon_run(mode):
    """``model, dp_opt, loader = engine.make_private(optimizer=opt, ...)`` and the existing loop
    keeps calling ``opt.step()`` (the name it always had).  Backward fills the ordinary
    ``p.grad`` (hooks: every layer; bk: the first layer), the plain optimizer applies it --
    unclipped, without noise -- and the DP optimizer never steps, so the accountant holds no
    step: ``get_epsilon`` prints 0.0 and ``privacy_report`` says steps = 0 for a model trained
    on the private crops without any protection (the true epsilon is unbounded).  Round 1
    refused the mirror image (iterating the original *loader*); the original *optimizer* is
    not watched.  The safe behaviour: the step is refused, or at least no epsilon below
    infinity is printed for the parameters it moved."""
    torch.manual_seed(0)
    model = TinySegNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    before = _snapshot(params)
    try:
        engine, out = _private(model, mode=mode, optimizer=opt)
        gsm, loader = out[0], out[-1]
        for x, y in loader:
            opt.zero_grad()
            per_image_ce()(gsm(x), y).backward()
            opt.step()                       # the original optimizer, not out[1]
        eps = engine.get_epsilon(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    moved = _moved(params, before)
    assert moved == 0 or eps == float("inf"), (
        f"the model moved by {moved:.3g} on un-noised, unclipped gradients of private crops, "
        f"and get_epsilon printed {eps} ({len(engine.accountant)} accounted steps)")


# --- finding 2: parameters unfrozen after make_private, stepped by a second optimizer ----------
@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost"])
def test_parameters_unfrozen_after_make_private_cannot_escape_the_dp_step(mode):
    """Gradual unfreezing: the backbone is frozen for the warm-up epoch (so make_private sees
    only the head as trainable, and its "every trainable parameter must be in the DP optimizer"
    check passes), then ``model.body.requires_grad_(True)`` with its own optimizer at a smaller
    learning rate.  The check of round 1 (test_trainable_parameters_outside_the_dp_optimizer_
    are_refused) runs only inside make_private: no layer hook and no optimizer step looks again.
    Backward fills the backbone's ordinary .grad (unclipped, no noise) in all three modes, the
    second optimizer releases it into the weights, and get_epsilon prints the DP-SGD epsilon
    of the head's steps (6.8 here) for a model whose backbone was trained without DP."""
    torch.manual_seed(0)
    model = TinySegNet()
    model.body.requires_grad_(False)                        # warm-up: backbone frozen
    head_opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    body = list(model.body.parameters())
    before = _snapshot(body)
    try:
        engine, out = _private(model, mode=mode, optimizer=head_opt)
        gsm, dp_opt, loader = out[0], out[1], out[-1]
        crit = out[2] if len(out) == 4 else per_image_ce()
        for epoch in range(2):
            if epoch == 1:                                  # unfreeze, own learning rate
                model.body.requires_grad_(True)
                body_opt = torch.optim.SGD(model.body.parameters(), lr=0.01)
            for x, y in loader:
                dp_opt.zero_grad()
                if epoch == 1:
                    body_opt.zero_grad()
                crit(gsm(x), y).backward()
                dp_opt.step()
                if epoch == 1:
                    body_opt.step()
        eps = engine.get_epsilon(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    moved = _moved(body, before)
    assert moved == 0, (
        f"un-noised, unclipped updates moved the backbone by {moved:.3g} while get_epsilon "
        f"prints {eps:.3g} for the run")


# --- finding 3: the forward pass through the original module skips ModuleIntegrity -------------
class _RunningMean(nn.Module):
    """A buffer updated in place from the private batch (an EMA of input statistics)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x):
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * x.mean(dim=(0, 2, 3)).detach())
        return self.conv(x)


class _BNNet(nn.Module):
    """BatchNorm without affine parameters (Opacus' validator does not look at it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _ema_model():
    return _RunningMean()


def _bn_put_in_eval_mode_by_hand():
    model = _BNNet()
    model.bn.eval()  # the refusal message's advice: "put it in eval mode and keep it there"
    return model


@pytest.mark.parametrize("make_model", [_ema_model, _bn_put_in_eval_mode_by_hand])
def test_forward_through_the_original_module_is_checked_like_the_wrapper(make_model):
    """``dp_model, opt, loader = make_private(module=model, ...)`` and the loop calls
    ``model.train()`` / ``model(x)`` -- the module it built, not the GradSampleModule returned.
    In hooks mode (the default) Opacus' per-layer hooks sit on the inner module, so per-sample
    gradients, clipping, noise and accounting all work, but ModuleIntegrity's forward hooks sit
    on the *wrapper*: through the original module no forward is checked.  An in-place EMA of the
    private batch (refused through the wrapper, round 1) lands in state_dict() without noise;
    a BatchNorm put in eval mode by hand (as make_private's refusal advises) and switched back
    by the loop's usual ``model.train()`` normalises with batch statistics (one image changes
    every other sample's gradient: sensitivity above 2C) and writes running statistics -- both
    accepted, epsilon printed as if neither happened (through the wrapper both raise
    SampleMixingError)."""
    model = make_model()
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        engine, (dp_model, opt, loader) = _private(model)
        for x, y in loader:
            model.train()
            opt.zero_grad()
            per_image_ce()(model(x), y).backward()   # the original module
            opt.step()
    except SAFE_ERRORS:
        return  # refused: safe
    changed = [k for k, v in model.state_dict().items()
               if k in state0 and v.dtype.is_floating_point and k.split(".")[-1] in
               ("ema", "running_mean", "running_var") and not torch.equal(v, state0[k])]
    assert not changed, (
        f"buffers {changed} hold statistics of private batches, written without noise, while "
        f"get_epsilon prints {engine.get_epsilon(1e-3):.3g} ({len(engine.accountant)} steps)")


def test_model_state_written_by_the_loop_between_steps_is_refused():
    """Round 1 refuses buffer / frozen-parameter writes *inside* a training forward; the same
    write one line later in the loop (``model.prototypes.mul_(0.9).add_(...)`` from the batch's
    features, after ``optimizer.step()``) is never compared: the prototypes -- per-class means
    of private crops, without noise -- are released with the model beside the printed
    epsilon.  Checking, at every training forward, that the model state equals what the last
    DP step left behind covers this, finding 1 and finding 2 at once."""
    model = _Prototypes()
    try:
        engine, (dp_model, opt, loader) = _private(model)
        for x, y in loader:
            opt.zero_grad()
            logits = dp_model(x)
            per_image_ce()(logits, y).backward()
            opt.step()
            with torch.no_grad():                   # per-class mean feature of the batch
                feats = logits.detach().permute(0, 2, 3, 1).reshape(-1, 3)
                labels = y.reshape(-1)
                for c in range(3):
                    if (labels == c).any():
                        model.prototypes[c].mul_(0.9).add_(0.1 * feats[labels == c].mean(0))
    except SAFE_ERRORS:
        return  # refused: safe
    assert not model.prototypes.abs().sum() > 0, (
        f"per-class means of private crops sit in state_dict()['prototypes'] without noise; "
        f"get_epsilon prints {engine.get_epsilon(1e-3):.3g}")


# --- finding 4: one image held by two dataset objects -------------------------------------------
def _two_tensor_datasets():
    x = torch.randint(0, 256, (12, 3, *SIZE), dtype=torch.uint8)
    y = torch.zeros(12, *SIZE, dtype=torch.long)
    return ConcatDataset([TensorDataset(x, y), TensorDataset(x, y)])   # same tensors twice


def _flip_augmented_copy():
    from patchdp_opacus.segmentation.augment import build_transforms
    from patchdp_opacus.segmentation.datasets.synthetic import SyntheticStreetScenes

    data = dict(root=None, split="train", num_samples=12, image_size=(32, 64), seed=0)
    flip = build_transforms([{"tv.RandomHorizontalFlip": {"p": 1.0}}])
    return ConcatDataset([SyntheticStreetScenes(**data),                  # the images ...
                          SyntheticStreetScenes(**data, transform=flip)])  # ... and mirrored


@pytest.mark.parametrize("make_dataset", [_two_tensor_datasets, _flip_augmented_copy])
def test_the_same_images_in_two_dataset_objects_are_refused(make_dataset):
    """"Double the data set with a flipped copy": ``ConcatDataset([ds, ds_flipped])`` built from
    two instances over the same images (or two TensorDatasets over the same tensors).  Round 1
    refuses ``ConcatDataset([ds, ds])``, but ``check_unique_records`` keys records by
    ``id(dataset)``: two objects over the same images pass.  N = 24 records hold 12 images, so
    every private region is in two records -- it enters a step with probability about 2q, and
    both copies can share one batch (sensitivity 4C) -- while the accountant composes one
    record at q = B/N with sensitivity 2C (Theorem 2 does not cover this: group privacy of 2
    would)."""
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    dataset = make_dataset()
    size = tuple(dataset[0][0].shape[-2:])
    with pytest.raises(ValueError):
        CropDPDataLoader.from_data_loader(DataLoader(dataset, batch_size=4), crop=CROP,
                                          private_region=REGION, image_sizes=[size])


# --- finding 5: patchdp train resumed without reproducible noise forgets that it had it --------
def test_a_resumed_run_reports_the_noise_and_sampling_of_every_segment(tmp_path):
    """Debug the first epoch with ``privacy.reproducible_noise/sampling: true`` (noise and crops
    from ``training.seed``, which sits in config.yaml), interrupt, resume with the defaults
    for the real run.  ``_check_resumable`` compares only the accounting; the report and
    config.yaml are rewritten from the *current* config, so privacy_report says "drawn from OS
    entropy, not reproducible from the config" for a run whose first three noisy steps anyone
    with config.yaml can regenerate and subtract (their epsilon is unbounded).  The safe
    behaviour: refuse the resume, or keep saying that some steps' noise is reproducible."""
    from test_train_cli import write_cfg

    from patchdp_opacus.cli import main

    cfg = write_cfg(tmp_path)        # TINY: 24 images, B = 8, 3 steps per epoch, 2 epochs
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--output", str(run), "--quiet", "--max-steps", "3",
                 "--set", "privacy.reproducible_noise=true",
                 "--set", "privacy.reproducible_sampling=true"]) == 0
    try:
        rc = main(["train", "--config", cfg, "--output", str(run), "--quiet"])
    except SystemExit as exc:
        rc = exc.code
    if rc != 0:
        return  # refused: safe
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["steps"] == 6
    assert "reproducible" in report["noise_source"] and "OS entropy" not in \
        report["noise_source"], (f"steps 1-3 used noise from the config seed; the report says "
                                 f"{report['noise_source']!r}")
    assert "OS entropy" not in report["sampling_source"], report["sampling_source"]


# --- finding 6: DTD validation partition that overlaps the training partition ------------------
def _dtd_with_two_partitions(root):
    """write_dtd's folder plus partition 2, which (as in the real DTD) re-splits the same
    images: validation image 4 of partition 1 is a training image of partition 2."""
    from classification_data import DTD_CLASSES, write_dtd

    write_dtd(root, per_class=6, sizes=((32, 32),))
    lines = {"train": [], "val": [], "test": []}
    for name in DTD_CLASSES:
        for i in range(6):
            split = "val" if i == 0 else "test" if i == 1 else "train"
            lines[split].append(f"{name}/{name}_{i:04d}.jpg")
    for split, entries in lines.items():
        (root / "labels" / f"{split}2.txt").write_text("".join(f"{e}\n" for e in entries))
    return root


def test_dtd_validation_on_another_partition_than_training_is_refused(tmp_path):
    """DTD ships 10 partitions, each a re-split of the same 5640 images.  Training on another
    fold (``--set dataset.train.partition=2``) while the config's validation split stays on
    partition 1 passes ``_validation_is_not_training``, which compares only the split names
    (train vs val): a third of the validation images are training images, and their accuracy,
    per-class accuracy (and confusion matrix) are released in metrics.csv / final_metrics.json
    without noise, beside the printed epsilon.  (A2D2's ``sessions`` argument opens the same
    door: val sessions listed from the training split.)"""
    from pathlib import Path

    from patchdp_opacus.classification.datasets import DTD
    from patchdp_opacus.cli import main

    data = _dtd_with_two_partitions(tmp_path / "dtd300")
    config = Path(__file__).resolve().parents[1] / "configs" / "dtd" / "resnet18.yaml"
    run = tmp_path / "run"
    small = ["--quiet", "--max-steps", "1", "--epochs", "1", "--device", "cpu",
             "--set", "training.batch_size=4", "--set", "training.max_physical_batch_size=4",
             "--set", "training.num_workers=0", "--set", "training.eval_batch_size=8",
             "--set", "model.weights=null", "--set", "model.num_classes=3",
             "--set", "privacy.crop=[12,12]", "--set", "privacy.private_region.size=[3,3]",
             "--set", "dataset.train.image_size=[32,32]", "--set", "dataset.val.image_size=[32,32]",
             "--set", "dataset.train.min_side=32", "--set", "dataset.val.min_side=32",
             "--noise-multiplier", "1"]
    try:
        rc = main(["train", "--config", str(config), "--data-root", str(data), *small,
                   "--set", "dataset.train.partition=2", "--output", str(run)])
    except SystemExit as exc:
        rc = exc.code
    if rc != 0:
        return  # refused: safe
    train = DTD(data, "train", 2, image_size=(32, 32), min_side=32)
    val = DTD(data, "val", 1, image_size=(32, 32), min_side=32)
    shared = sorted({p.name for p in train.paths} & {p.name for p in val.paths})
    final = json.loads((run / "final_metrics.json").read_text())
    assert not shared, (f"validation images {shared} are training images; their accuracy "
                        f"{final['accuracy']} was released without noise")


# --- finding 7: a post-crop stage that keeps state across samples ------------------------------
class _RunningStandardize:
    """Per-channel standardisation by the running mean of the crops seen so far (an "online
    dataset normalisation" written as a transform)."""

    def __init__(self):
        self.total, self.count = torch.zeros(3), 0

    def __call__(self, sample):
        image, mask = sample
        self.total += image.float().mean(dim=(1, 2))
        self.count += 1
        return image - (self.total / self.count).view(3, 1, 1), mask


def test_a_post_crop_stage_that_carries_state_across_samples_is_refused():
    """``post_crop_transform`` is trusted because "a function of the crop cannot depend on
    pixels outside it" (the docstring adds: "it must not carry state across samples"; nothing
    checks it).  A running normaliser makes every later sample (in this and later steps) a
    function of earlier crops -- including a crop that covered another image's private region:
    that image's region then reaches every later step, which the accountant composes at
    w = q*p as if only its own crops could."""
    if not post_crop_refused(_RunningStandardize(), dataset=TinySegData(24, SIZE)):
        pytest.fail("a post-crop transform whose output depends on earlier samples was accepted")


# --- controls: what the fixes must keep working --------------------------------------------------
def test_controls_dp_optimizer_steps_distinct_datasets_and_stateless_post_crop():
    model = TinySegNet()
    engine, (gsm, opt, loader) = _private(model)
    for x, y in loader:                                  # the returned objects: accepted
        opt.zero_grad()
        per_image_ce()(gsm(x), y).backward()
        opt.step()
    assert len(engine.accountant) == len(loader)
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    def images():
        return (torch.randint(0, 256, (6, 3, *SIZE), dtype=torch.uint8),
                torch.zeros(6, *SIZE, dtype=torch.long))

    two = ConcatDataset([TensorDataset(*images()), TensorDataset(*images())])  # 12 images
    stateless = T2.ColorJitter(contrast=0.5)
    loader = CropDPDataLoader.from_data_loader(
        DataLoader(two, batch_size=4), crop=CROP, private_region=REGION, image_sizes=[SIZE],
        post_crop_transform=lambda s: (stateless(s[0]), s[1]))
    assert sum(len(b[0]) for b in loader) == 4 * len(loader)
