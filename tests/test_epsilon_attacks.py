"""Reviewed attacks: ways in which a printed epsilon did not hold for the training that ran.

Every test here asserts the *safe* behaviour (an error, or a property DP-SGD needs) and fails on
the code it was written against.  Each one is small: tiny models, 20x20 images, seconds.
"""


import pytest
import torch
import torchvision.transforms.v2 as T2
from attack_helpers import CROP, REGION, SAFE_ERRORS, SIZE
from attack_helpers import make_loader as _loader
from attack_helpers import make_private as _private
from plugin_helpers import TinySegData, TinySegNet, per_image_ce
from torch import nn
from torch.utils.data import DataLoader

from patchdp_opacus import PrivacyEngine


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _moved(model, before):
    return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                                for p, b in zip(model.parameters(), before))))


# --- finding 1: ghost mode, the wrapped criterion plus a plain tensor ---------------------------
def test_ghost_loss_plus_plain_tensor_term_cannot_escape_clipping():
    """Ghost mode returns a wrapped criterion; Opacus lets ``loss + tensor`` through
    (``DPTensorFastGradientClipping.__add__``), e.g. an auxiliary-head loss computed with a plain
    criterion or a regulariser.  The second (weighted) backward then multiplies that term by
    the *sum* of all clip factors, not by each sample's own: one sample's contribution is not
    clipped.  With noise 0, lr 1 and loss_reduction="mean" a DP step moves the weights by at
    most C; here it moved them ~190 C, and the accountant charged one ordinary step."""
    torch.manual_seed(0)
    model = TinySegNet()
    clip = 1.0
    engine, (gsm, opt, crit, loader) = _private(model, mode="ghost", noise=0.0, clip=clip,
                                                lr=1.0)
    x, y = next(iter(loader))
    before = _params(model)
    try:
        opt.zero_grad()
        logits = gsm(x)
        loss = crit(logits, y) + 1000.0 * logits[0].pow(2).mean()   # aux term, plain tensor
        loss.backward()
        opt.step()
    except SAFE_ERRORS:
        return  # refused: safe
    assert _moved(model, before) <= clip * (1 + 1e-3), (
        f"one DP step moved the weights by {_moved(model, before):.3g} > C = {clip}: a "
        f"sample's gradient entered the release unclipped, yet {len(engine.accountant)} "
        f"ordinary step was accounted")



def test_ghost_step_with_an_unwrapped_loss_cannot_reuse_stale_norms():
    """After one step with the wrapped criterion, a step whose loss comes from a plain
    criterion (a warm-up/extra loss branch, a re-bound ``criterion`` variable) is accepted:
    the rows check reads ``per_sample_gradient_norms`` left over from the previous step (B
    rows), and DPOptimizerFastGradientClipping releases ``p.grad`` as if it were the clipped
    sum -- here the unclipped batch gradient (moved 2.4 with C = 1e-3)."""
    torch.manual_seed(0)
    model = TinySegNet()
    clip = 1e-3
    engine, (gsm, opt, crit, loader) = _private(model, mode="ghost", noise=0.0, clip=clip,
                                                lr=1.0)
    batches = iter(loader)
    x, y = next(batches)
    opt.zero_grad()
    crit(gsm(x), y).backward()
    opt.step()
    x, y = next(batches)
    before = _params(model)
    try:
        opt.zero_grad()
        (100 * per_image_ce()(gsm(x), y)).backward()   # not the wrapped criterion
        opt.step()
    except SAFE_ERRORS:
        return  # refused: safe
    assert _moved(model, before) <= clip * (1 + 1e-3), (
        f"moved {_moved(model, before):.3g} > C = {clip}: an unclipped gradient was released "
        f"and accounted as DP step {len(engine.accountant)}")

# --- finding 2: BatchNorm in eval mode that still normalises with batch statistics -----------
class _BNNet(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bn
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _bn_without_running_stats():
    return nn.BatchNorm2d(4, affine=False, track_running_stats=False)


def _bn_running_stats_dropped():
    bn = nn.BatchNorm2d(4, affine=False)
    bn.running_mean = bn.running_var = None   # torch then uses batch statistics in eval too
    return bn


@pytest.mark.parametrize("make_bn", [_bn_without_running_stats, _bn_running_stats_dropped])
def test_batchnorm_in_eval_mode_that_uses_batch_statistics_is_refused(make_bn):
    """The refusal message says "put it in eval mode and keep it there", and
    ``mixing_modules`` skips every module with ``training == False``.  But a BatchNorm without
    running statistics (``track_running_stats=False``, or ``running_mean is None``) normalises
    with the statistics of the *batch* in eval mode as well (torch: ``bn_training = training or
    running_mean is None``): one image changes every other sample's output and gradient, so the
    sensitivity of a step is not 2C.  Opacus' validator only looks at BatchNorm with trainable
    parameters (affine=False has none), so nothing refuses it."""
    bn = make_bn()
    bn.eval()
    model = _BNNet(bn)
    x = torch.rand(4, 3, 8, 8)
    x2 = x.clone()
    x2[0] += 5.0
    with torch.no_grad():   # the premise: sample 1's output depends on sample 0 in eval mode
        assert not torch.allclose(model(x)[1], model(x2)[1])
    with pytest.raises(SAFE_ERRORS):
        engine, (gsm, opt, loader) = _private(model)
        for xb, yb in loader:
            opt.zero_grad()
            per_image_ce()(gsm(xb), yb).backward()
            opt.step()


# --- finding 3: noisy steps that are not one draw of the crop-aware loader -------------------
def test_noisy_step_on_a_batch_the_private_loader_never_drew_is_refused():
    """``model, optimizer, dp_loader = make_private(data_loader=train_loader, ...)`` and then the
    loop keeps iterating ``train_loader`` (a renamed variable): full-size, never-cropped images,
    shuffled with torch's epoch permutation.  The guard only counts rows (6 = B), so every step
    is accepted and accounted with q = B/N *and* the crop amplification p of a crop that never
    happened; get_epsilon prints the patch-level epsilon with p = 64/169 for a run in which
    every image was used whole (and not even sampled as Theorem 2 assumes)."""
    train_loader = _loader(shuffle=True)
    engine, (gsm, opt, dp_loader) = _private(TinySegNet(), loader=train_loader)
    x, y = next(iter(train_loader))
    assert tuple(x.shape[-2:]) == SIZE   # the premise: uncropped images
    with pytest.raises(SAFE_ERRORS):
        opt.zero_grad()
        per_image_ce()(gsm(x), y).backward()
        opt.step()
    assert len(engine.accountant) == 0


def test_two_noisy_steps_on_one_drawn_batch_are_refused():
    """Several optimizer steps on one batch (local steps, SAM-like two-step optimizers, a
    "repeat the batch" loop): both noisy releases depend on the same sampling and crop draw,
    but the accountant composes two independent steps at w = q*p.  Their joint privacy loss is
    that of (1-w) N(0)^2 + w N(2)^2 vs N(0)^2, larger than two independent steps; the guard
    sees B rows each time and accepts."""
    engine, (gsm, opt, dp_loader) = _private(TinySegNet())
    x, y = next(iter(dp_loader))
    opt.zero_grad()
    per_image_ce()(gsm(x), y).backward()
    opt.step()
    assert len(engine.accountant) == 1
    with pytest.raises(SAFE_ERRORS):
        opt.zero_grad()
        per_image_ce()(gsm(x), y).backward()
        opt.step()
    assert len(engine.accountant) == 1


# --- finding 4: trainable parameters outside the DP optimizer --------------------------------
@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost"])
def test_trainable_parameters_outside_the_dp_optimizer_are_refused(mode):
    """The DP optimizer holds the head's parameters; the backbone stays trainable and a second,
    plain optimizer steps it (two optimizers with different learning rates / types, or a
    backbone optimizer forgotten in make_private).  make_private only checks optimizer params
    are a subset of the module's; backward fills the backbone's ordinary .grad (unclipped, no
    noise) and the plain optimizer releases it into the model, while get_epsilon prints the
    DP-SGD epsilon of the head's steps."""
    model = TinySegNet()
    dp_opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    plain_opt = torch.optim.SGD(model.body.parameters(), lr=0.1)
    w0 = model.body[0].weight.detach().clone()
    try:
        engine, out = _private(model, mode=mode, optimizer=dp_opt)
        gsm, opt, loader = out[0], out[1], out[-1]
        crit = out[2] if len(out) == 4 else per_image_ce()
        for x, y in loader:
            opt.zero_grad()
            plain_opt.zero_grad()
            crit(gsm(x), y).backward()
            opt.step()
            plain_opt.step()
    except SAFE_ERRORS:
        return  # refused: safe
    moved = not torch.equal(model.body[0].weight.detach(), w0)
    assert not moved, (
        f"un-noised, unclipped updates reached the backbone while get_epsilon prints "
        f"{engine.get_epsilon(1e-3):.3g}")


# --- finding 5: batch statistics kept in model state without noise ---------------------------
class _StatNet(nn.Module):
    """A per-channel running mean of the inputs (EMA), written three ordinary ways."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("ema", torch.zeros(3))
        self.proto = nn.Parameter(torch.zeros(3), requires_grad=False)

    def forward(self, x):
        if self.training:
            m = x.mean(dim=(0, 2, 3)).detach()
            if self.how == "reassign":           # functional EMA: a new tensor each step
                self.ema = 0.9 * self.ema + 0.1 * m
            elif self.how == "data":             # in place through .data
                self.ema.data.mul_(0.9).add_(0.1 * m)
            elif self.how == "frozen_parameter":  # prototypes / codebook kept as a Parameter
                with torch.no_grad():
                    self.proto.mul_(0.9).add_(0.1 * m)
        return self.conv(x)


@pytest.mark.parametrize("how", ["reassign", "data", "frozen_parameter"])
def test_batch_statistics_written_to_model_state_are_refused(how):
    """ModuleIntegrity compares the ``_version`` of the buffer *objects* it saw before the
    forward: a reassigned buffer (``self.ema = 0.9 * self.ema + ...``), an update through
    ``.data`` (no version bump) and a frozen Parameter updated in place are not seen.  The
    statistic of the private batch lands in ``state_dict()`` -- released with the model, no
    noise, not covered by the printed epsilon.  (The in-place buffer update is refused.)"""
    model = _StatNet(how)
    try:
        engine, (gsm, opt, loader) = _private(model)
        for x, y in loader:
            opt.zero_grad()
            per_image_ce()(gsm(x), y).backward()
            opt.step()
    except SAFE_ERRORS:
        return  # refused: safe
    assert float(model.ema.abs().sum() + model.proto.abs().sum()) == 0.0, (
        f"a statistic of private batches is in the released state_dict "
        f"(ema={model.ema.tolist()}, proto={model.proto.tolist()}), not covered by epsilon")


# --- finding 6: the same image as several records --------------------------------------------
def _duplicated(kind):
    from torch.utils.data import ConcatDataset, Subset

    base = TinySegData(12, SIZE)
    if kind == "concat":
        return ConcatDataset([base, base])          # "repeat the data set" / longer epochs
    return Subset(base, list(range(12)) * 2)        # oversampling by repeated indices


@pytest.mark.parametrize("kind", ["concat", "subset"])
def test_a_dataset_holding_one_image_twice_is_refused(kind):
    """N = 24 records but only 12 images: each image (and its private region) is in two
    records.  The accountant uses q = B/N = 0.25 and sensitivity 2C, but an image enters a
    batch with probability 1 - (18/24)(17/23) ~ 0.45 and can enter it twice (4C): the
    neighbouring relation is a group of 2 records, not the one record Theorem 2 covers."""
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    dataset = _duplicated(kind)
    with pytest.raises(SAFE_ERRORS):
        CropDPDataLoader.from_data_loader(DataLoader(dataset, batch_size=6), crop=CROP,
                                          private_region=REGION, image_sizes=[SIZE])


# --- finding 7: transforms the inspection never saw --------------------------------------------
class _RotatingLater(torch.utils.data.Dataset):
    image_sizes = [SIZE]

    def __init__(self):
        self.transform = None

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.rand(3, *SIZE)
        return (self.transform(x) if self.transform is not None else x), 0


def test_a_transform_set_after_the_loader_was_built_is_refused():
    """The inspection runs once, in the loader's constructor; the loader keeps the same
    dataset object.  Assigning ``dataset.transform`` afterwards (code order, or an augmentation
    schedule that switches rotations on at epoch k) puts a rotation before the crop that
    nothing inspects, while the README promises it is refused."""
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    dataset = _RotatingLater()
    loader = CropDPDataLoader.from_data_loader(DataLoader(dataset, batch_size=4), crop=CROP,
                                               private_region=REGION)
    dataset.transform = T2.RandomRotation(45)
    with pytest.raises(SAFE_ERRORS):
        for _ in loader:
            pass


class _ClassAttributeAugment(torch.utils.data.Dataset):
    augment = T2.RandomRotation(45)               # a class attribute, shared by instances
    image_sizes = [SIZE]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.augment(torch.rand(3, *SIZE)), 0


class _SlotsAugment(torch.utils.data.Dataset):
    __slots__ = ("augment",)
    image_sizes = [SIZE]

    def __init__(self):
        self.augment = T2.RandomRotation(45)       # stored in a slot, not in __dict__

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.augment(torch.rand(3, *SIZE)), 0


@pytest.mark.parametrize("dataset_cls", [_ClassAttributeAugment, _SlotsAugment])
def test_transforms_outside_the_instance_dict_are_inspected(dataset_cls):
    """The walk reads ``obj.__dict__`` only: a transform held as a class attribute or in a
    ``__slots__`` slot (also ``@dataclass(slots=True)``) is never classified, so a rotation
    before the crop is accepted (``inspection.checked == []``)."""
    from patchdp_opacus.plugin.transforms import (
        TransformNotAllowedError,
        inspect_dataset,
    )

    with pytest.raises(TransformNotAllowedError):
        inspect_dataset(dataset_cls())


# --- finding 8: the post-crop stage is not inspected ------------------------------------------
class _CopyPaste:
    """Simple Copy-Paste: paste a piece of another (full, uncropped) training image."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, sample):
        image, target = sample
        other = self.dataset[int(torch.randint(len(self.dataset), ()))][0]
        image = image.clone()
        image[:, :4, :4] = other[:, 8:12, 8:12]
        return image, target


def test_a_post_crop_transform_that_reads_other_training_images_is_refused():
    """``post_crop_transform`` is applied without any inspection because "a function of the
    crop cannot depend on pixels outside it".  A callable that holds the data set (copy-paste,
    mosaic or mix-in augmentations) is not a function of the crop: every sample can carry
    pixels of any other image's private region, whatever that image's crop was."""
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    dataset = TinySegData(8, SIZE)
    with pytest.raises(SAFE_ERRORS):
        loader = CropDPDataLoader.from_data_loader(
            DataLoader(dataset, batch_size=4), crop=CROP, private_region=REGION,
            image_sizes=[SIZE], post_crop_transform=_CopyPaste(dataset))
        for _ in loader:
            pass


# --- finding 9: albumentations' resize family before the crop --------------------------------
def _alb_random_smallest_max_size():
    import albumentations as A
    return A.SmallestMaxSize(max_size=[16, 20, 24], interpolation=0, p=1.0)


def _alb_random_longest_max_size():
    import albumentations as A
    return A.LongestMaxSize(max_size=[16, 20, 24], interpolation=0, p=1.0)


def _alb_nearest_resize_with_area_downscale():
    import albumentations as A
    return A.Resize(16, 16, interpolation=0, area_for_downscale="image")


@pytest.mark.parametrize("make", [_alb_random_smallest_max_size, _alb_random_longest_max_size,
                                  _alb_nearest_resize_with_area_downscale])
def test_albumentations_random_or_area_resize_before_the_crop_is_refused(make):
    """Allowed as "deterministic geometry" when ``interpolation`` is nearest, but
    (a) ``SmallestMaxSize``/``LongestMaxSize(max_size=[...])`` draw the size at random: random
    scale jitter before the crop (the reason torchvision's RandomShortestSize is refused: the
    region's size in pixels changes with the scale); (b) ``area_for_downscale="image"``
    switches the image kernel to cv2.INTER_AREA whenever it downscales, so a region spreads
    over more output pixels than a nearest resize gives (a 6x6 region downscaled 3x: 3x3
    output pixels instead of 2x2), and ``p`` for the region declared in resized pixels does
    not hold."""
    import albumentations as A

    from patchdp_opacus.plugin.transforms import (
        TransformNotAllowedError,
        inspect_pipeline,
    )

    with pytest.raises(TransformNotAllowedError):
        inspect_pipeline(A.Compose([make()]))


# --- finding 10: reports of the randomness sources ---------------------------------------------
def test_reports_follow_the_sampling_and_noise_generators_actually_used():
    """Opacus' ``switch_generator(data_loader=loader, generator=g)`` replaces the generator of
    the loader's (shared) batch sampler, and an Opacus user may set ``optimizer.generator``;
    both are then used as given -- batches, crops and noise reproducible from seed 0 -- while
    the privacy report still says "generator seeded from OS entropy" and "torch generator
    seeded from OS entropy (not reproducible from any seed)"."""
    from opacus.data_loader import switch_generator

    engine, (gsm, opt, loader) = _private(TinySegNet())
    switch_generator(data_loader=loader, generator=torch.Generator().manual_seed(0))
    sampler = loader.batch_sampler
    probe = torch.Generator().manual_seed(0)
    reproducible_sampling = sampler.generator is not None and \
        sampler.generator.get_state().equal(probe.get_state())
    opt.generator = torch.Generator().manual_seed(0)
    x, y = next(iter(loader))
    opt.zero_grad()
    per_image_ce()(gsm(x), y).backward()
    opt.step()
    report = engine.privacy_report(1e-3)
    if reproducible_sampling:
        assert "OS entropy" not in report["sampling_source"], report["sampling_source"]
    if opt.generator is not None and opt.generator.initial_seed() == 0:
        assert "not reproducible" not in report["noise_source"], report["noise_source"]


def test_inheriting_the_users_seeded_dataloader_generator_is_not_silent():
    """``DataLoader(..., generator=torch.Generator().manual_seed(42))`` is the usual way to make
    *shuffling* reproducible.  ``make_private`` silently takes that generator for the secret
    draws (batch indices and crop origins): they are reproducible from a seed that sits in the
    user's public code, and ``get_epsilon`` prints the amplified epsilon without a word (only
    the report's sampling_source mentions a seed)."""
    loader = _loader(generator=torch.Generator().manual_seed(42))
    with pytest.warns(UserWarning, match="(?i)seed|generator"):
        _private(TinySegNet(), loader=loader)


# --- finding 11: patchdp train evaluates on (and draws) private training images --------------
def test_train_refuses_or_flags_validation_on_the_training_split(tmp_path, capsys):
    """``dataset.val: {split: train, ...}`` (no validation split at hand) is accepted: the run
    releases mIoU, per-class IoU and pixel accuracy computed on training images without noise,
    and ``prediction.png`` shows training images with their predictions -- while
    ``privacy_report.txt`` states "no statistic of private batches leaves training
    un-noised"."""
    import yaml

    from patchdp_opacus.cli import main

    data = {"image_size": [32, 64], "seed": 3, "max_private_patch": [4, 4]}
    cfg = {
        "name": "tiny",
        "dataset": {"name": "synthetic", "root": None,
                    "train": {"split": "train", "num_samples": 24, **data},
                    "val": {"split": "train", "num_samples": 4, **data}},
        "model": {"arch": "deeplabv3plus", "encoder_name": "resnet18", "encoder_weights": None,
                  "num_classes": 19, "output_stride": 16, "norm": "group",
                  "aspp_rates": [2, 4, 6], "extra": {"encoder_depth": 3, "decoder_channels": 48}},
        "privacy": {"accounting": "patch", "epsilon": 6.0, "crop": [24, 24],
                    "private_region": {"shape": "rectangle", "size": [4, 4]},
                    "max_grad_norm": 1.0},
        "training": {"epochs": 1, "batch_size": 8, "max_physical_batch_size": 8, "lr": 0.1,
                     "eval_every": 1, "eval_batch_size": 2, "device": "cpu", "seed": 5},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    try:
        rc = main(["train", "--config", str(path), "--output", str(run), "--quiet",
                   "--max-steps", "1"])
    except SystemExit as exc:
        rc = exc.code
    if rc != 0:
        return  # refused: safe
    report = (run / "privacy_report.txt").read_text()
    assert "no statistic of private batches leaves training" not in report
    assert not (run / "prediction.png").exists(), "training images written to prediction.png"


# --- finding 12: one engine, two make_private calls with different geometries ----------------
def test_steps_of_a_first_make_private_are_not_accounted_with_a_later_geometry():
    """Two models (an ensemble, teacher and student) made private by one engine before
    training: the accountant holds a single spec, which the second call replaces
    (``set_spec`` allows it while no step was taken), but the first optimizer's hook still
    steps that accountant.  Model A is trained with a 16x16 crop (p = 1); its steps are
    accounted with model B's 4x4 crop (p = 16/289): get_epsilon printed 1.5 for a run whose
    epsilon is 9.3."""
    from patchdp_opacus.privacy import accounting

    engine = PrivacyEngine()
    a, b = TinySegNet(), TinySegNet()
    common = dict(noise_multiplier=1.0, max_grad_norm=1.0, private_region=REGION,
                  criterion=per_image_ce())
    try:
        gsm_a, opt_a, loader_a = engine.make_private(
            module=a, optimizer=torch.optim.SGD(a.parameters(), lr=0.1), data_loader=_loader(),
            crop=(16, 16), **common)
        engine.make_private(
            module=b, optimizer=torch.optim.SGD(b.parameters(), lr=0.1), data_loader=_loader(),
            crop=(4, 4), **common)
        for x, y in loader_a:
            opt_a.zero_grad()
            per_image_ce()(gsm_a(x), y).backward()
            opt_a.step()
    except SAFE_ERRORS:
        return  # refused: safe
    p_a = loader_a.inclusion_probability
    steps = len(engine.accountant)
    truth = accounting.epsilon(accounting.PatchDPSGD(1.0, loader_a.sample_rate, p_a, steps),
                               1e-3)
    assert engine.get_epsilon(1e-3) >= truth * (1 - 1e-6), (
        f"printed {engine.get_epsilon(1e-3):.3g} for model A's {steps} steps, whose epsilon "
        f"is {truth:.3g} (p = {p_a:.3g}, accountant p = "
        f"{engine.accountant.inclusion_probability:.3g})")


def test_steps_of_a_first_make_private_survive_a_later_opacus_mode_call():
    """Same engine, model A in the patch-level mode, then model B without a geometry (the
    Opacus mode) before any step: ``_switch_accountant`` swaps in a fresh 'prv' accountant, A's
    optimizer keeps stepping the orphaned patch accountant, and after A's 4 private steps
    ``privacy_report`` says steps = 0 and epsilon 0.0."""
    engine = PrivacyEngine()
    a, b = TinySegNet(), TinySegNet()
    try:
        gsm_a, opt_a, loader_a = engine.make_private(
            module=a, optimizer=torch.optim.SGD(a.parameters(), lr=0.1), data_loader=_loader(),
            noise_multiplier=1.0, max_grad_norm=1.0, crop=CROP, private_region=REGION)
        engine.make_private(module=b, optimizer=torch.optim.SGD(b.parameters(), lr=0.1),
                            data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
        for x, y in loader_a:
            opt_a.zero_grad()
            per_image_ce()(gsm_a(x), y).backward()
            opt_a.step()
        report = engine.privacy_report(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    assert report["steps"] == len(loader_a), report


# --- controls: what the fixes above must keep working ----------------------------------------
def test_controls_distinct_records_class_constants_and_a_plain_post_crop_stage():
    from torch.utils.data import ConcatDataset, Subset

    from patchdp_opacus.plugin.loader import CropDPDataLoader

    a, b = TinySegData(12, SIZE, seed=0), TinySegData(12, SIZE, seed=1)
    for dataset in (ConcatDataset([a, b]), Subset(a, [0, 3, 5, 7, 9, 11]),
                    ConcatDataset([Subset(a, [0, 1, 2]), Subset(a, [3, 4, 5])])):
        loader = CropDPDataLoader.from_data_loader(
            DataLoader(dataset, batch_size=3), crop=CROP, private_region=REGION,
            image_sizes=[SIZE], post_crop_transform=T2.ColorJitter(contrast=0.5))
        for x, _ in loader:
            assert x.shape[-2:] == CROP
    bn = nn.BatchNorm2d(4, affine=False).eval()   # eval mode with running statistics: per sample
    engine, (gsm, opt, loader) = _private(_BNNet(bn))
    for xb, yb in loader:
        opt.zero_grad()
        per_image_ce()(gsm(xb), yb).backward()
        opt.step()
    assert len(engine.accountant) == len(loader)
