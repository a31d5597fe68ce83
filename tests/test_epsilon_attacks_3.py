"""Third red-team round: ways in which a printed epsilon did not hold for the training that ran,
against the round-2 fixes (4b68873: ModuleIntegrity's whole-state reference, record_key,
post_crop_state).

Every test asserts the *safe* behaviour (an error, or the property the printed claim needs) and
fails on the code it was written against.  Tiny models and data, seconds each.
"""

import os

import numpy as np
import pytest
import torch
from attack_helpers import CROP, REGION, SAFE_ERRORS, SIZE, post_crop_refused
from attack_helpers import Prototypes as _Prototypes
from attack_helpers import dp_pass as _dp_pass
from attack_helpers import make_loader as _loader
from attack_helpers import make_private as _private
from plugin_helpers import TinySegData, TinySegNet, per_image_ce
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader


def _write_prototypes(model, logits, y):
    with torch.no_grad():
        feats = logits.detach().permute(0, 2, 3, 1).reshape(-1, 3)
        labels = y.reshape(-1)
        for c in range(3):
            if (labels == c).any():
                model.prototypes[c] = feats[labels == c].mean(0)   # private class means


# --- finding 1: a change between the checked forward and the DP step is taken as the DP step's --
def _prototypes_before_the_step():
    model = _Prototypes()
    engine, (dp_model, opt, loader) = _private(model)
    for x, y in loader:
        opt.zero_grad()
        logits = dp_model(x)
        per_image_ce()(logits, y).backward()
        _write_prototypes(model, logits, y)      # one line *before* opt.step()
        opt.step()
    return engine, model.prototypes.abs().sum() > 0


def _original_optimizer_before_the_dp_step():
    torch.manual_seed(0)
    model = TinySegNet()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, (gsm, dp_opt, loader) = _private(model, optimizer=plain)
    for x, y in loader:
        dp_opt.zero_grad()
        per_image_ce()(gsm(x), y).backward()
        plain.step()                             # un-noised, unclipped p.grad ...
        dp_opt.step()                            # ... then the DP step
    return engine, True


@pytest.mark.parametrize("loop", [_prototypes_before_the_step,
                                  _original_optimizer_before_the_dp_step])
def test_a_change_between_the_forward_and_the_dp_step_is_refused(loop):
    """The reference is compared at the training forward and *re-taken after* the DP step
    (``LogicalBatchGuard.step``), but never compared *before* the step.  Round 2's prototype
    write (refused after ``opt.step()``) one line earlier -- between ``backward()`` and
    ``opt.step()`` -- is absorbed into the new reference: the private class means stay in
    state_dict() without noise.  Likewise an old loop that still calls the original
    optimizer's ``step()`` and then the DP one: every parameter moves by the un-noised,
    unclipped gradient each step (the non-private half of the update is as large as the DP
    half).  get_epsilon prints 5.31 for both.  (README: "checked again before every training
    forward, step, get_epsilon and report" -- the step is not.)  Fix: check_unchanged() at the
    start of the DP step (pre_step, also for skipped BatchMemoryManager chunks), then re-take."""
    try:
        engine, leaked = loop()
        eps = engine.get_epsilon(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    assert not leaked, f"a non-DP change of the model was accepted; get_epsilon prints {eps:.3g}"


# --- finding 2: (sum, 2-norm) per tensor cannot see a permutation ------------------------------
def test_a_data_dependent_reordering_of_the_weights_is_refused():
    """The whole-state reference keeps two numbers per tensor, its sum and its 2-norm (within
    1e-9).  Any change that keeps both is invisible: a permutation of the entries, a swap of
    channels.  The loop reorders the head's input channels by the mean activation of the
    private batch after every DP step ("sort channels by importance", as channel-pruning code
    does): the order of the released weights is a function of private crops without noise.
    get_epsilon prints 5.31.  Fix: compare the tensors themselves (a copy, or a hash of the
    bytes), not two moments."""
    torch.manual_seed(0)
    model = TinySegNet()
    try:
        engine, (gsm, opt, loader) = _private(model)
        changed = 0
        for x, y in loader:
            opt.zero_grad()
            per_image_ce()(gsm(x), y).backward()
            opt.step()
            with torch.no_grad():
                order = torch.argsort(model.body(x).abs().mean(dim=(0, 2, 3)))
                before = model.head.weight.clone()
                model.head.weight.copy_(model.head.weight[:, order])
                changed += int(not torch.equal(before, model.head.weight))
        eps = engine.get_epsilon(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    assert changed == 0, (f"the head's weights were reordered by private activations {changed} "
                          f"times, unseen; get_epsilon prints {eps:.3g}")


# --- finding 3: NaN == NaN hides every later write to a tensor holding one NaN ------------------
def test_writes_to_a_tensor_that_holds_a_nan_are_refused():
    """Prototypes initialised to NaN ("class not seen yet", a common sentinel), one class never
    present in the data.  The snapshot maps a NaN sum or norm to the string "nan" and compares
    "nan" == "nan": once a tensor holds one NaN, any write to it is invisible.  Round 2's
    prototype loop (refused with zeros) passes with a NaN row: three rows of private class
    means are released without noise beside epsilon 5.31.  Fix: compare the tensor contents
    (torch.equal with equal_nan), not NaN-poisoned reductions."""
    model = _Prototypes(classes=4)
    with torch.no_grad():
        model.prototypes.fill_(float("nan"))      # class 3 never occurs
    try:
        engine, (dp_model, opt, loader) = _private(model)
        for x, y in loader:
            opt.zero_grad()
            logits = dp_model(x)
            per_image_ce()(logits, y).backward()
            opt.step()
            _write_prototypes(model, logits, y)  # after the step, as in round 2
        eps = engine.get_epsilon(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    written = int(torch.isfinite(model.prototypes).all(dim=1).sum())
    assert written == 0, (f"{written} rows of private class means were written between steps "
                          f"unseen; get_epsilon prints {eps:.3g}")


# --- finding 4 (false positive): a buffer holding -inf fails every forward ----------------------
class _MaskedLogits(nn.Module):
    """An additive logit mask kept as a buffer (-inf for a class that is switched off), as
    attention masks and class masks usually are."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("class_mask",
                             torch.tensor([0.0, 0.0, float("-inf")]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.conv(x) + self.class_mask.clamp(min=-1e4)


def test_a_constant_buffer_holding_inf_does_not_break_training():
    """An unchanged buffer that holds -inf (causal attention masks, class masks) makes the
    first training forward raise "the model changed outside the DP optimizer's step:
    ['buffer class_mask']": its sum is -inf, and ``_same_stats`` computes |-inf - -inf| = nan,
    which is never <= the tolerance.  Every transformer with a registered -inf mask is
    refused, which pushes users to turn the check off.  Fix: compare contents (torch.equal), or
    treat equal infinities as equal."""
    model = _MaskedLogits()
    engine, (dp_model, opt, loader) = _private(model)
    _dp_pass(dp_model, opt, loader)
    assert len(engine.accountant) == len(loader)


# --- finding 5: a changed model reaches a checkpoint / the accountant's epsilon unchecked ------
def _trained_then_calibrated():
    """DP training, then the head's bias set to the log class prior of the private masks
    ("bias calibration" on the training set) -- a change outside the DP step."""
    torch.manual_seed(0)
    model = TinySegNet()
    engine, (gsm, opt, loader) = _private(model)
    _dp_pass(gsm, opt, loader)
    data = TinySegData(24, SIZE)
    with torch.no_grad():
        prior = torch.bincount(data.masks.reshape(-1), minlength=3).double() / data.masks.numel()
        model.head.bias.copy_(prior.log())
    return engine, gsm, opt


def test_save_checkpoint_refuses_a_model_changed_outside_the_dp_step(tmp_path):
    """``engine.save_checkpoint`` does not compare the model with the reference, and
    ``engine.load_checkpoint`` takes whatever it loads as the new reference.  Calibrate the
    head's bias on the private masks after training (get_epsilon would refuse), save, resume:
    the model with the un-noised bias is now the reference and get_epsilon prints 5.31 for it.
    Fix: check_unchanged() in save_checkpoint (the checkpoint is what gets released or
    resumed)."""
    try:
        engine, gsm, opt = _trained_then_calibrated()
        path = tmp_path / "ckpt.pt"
        engine.save_checkpoint(path=path, module=gsm, optimizer=opt)
        engine.load_checkpoint(path=path, module=gsm, optimizer=opt)
        eps = engine.get_epsilon(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    pytest.fail(f"a checkpoint of a model changed outside the DP step was written and resumed; "
                f"get_epsilon prints {eps:.3g}")


def test_the_accountants_epsilon_is_checked_like_the_engines():
    """The README keeps ``accountant.get_epsilon`` working (the Opacus habit
    ``privacy_engine.accountant.get_epsilon(delta)``); ``engine.get_epsilon`` refuses the model
    changed outside the DP step, the accountant prints 5.31 for it.  Fix: the accountant asks
    the engine's integrity check (or get_epsilon there raises too)."""
    try:
        engine, _, _ = _trained_then_calibrated()
        eps = engine.accountant.get_epsilon(1e-3)
    except SAFE_ERRORS:
        return  # refused: safe
    pytest.fail(f"accountant.get_epsilon printed {eps:.3g} for a model changed outside the DP "
                f"step (engine.get_epsilon refuses it)")


# --- finding 6: post-crop state the fingerprint does not see ------------------------------------
class _Float32RunningMean:
    """A running mean of the crops computed in float32 numpy (albumentations-style pipelines
    work on float32 arrays): ``np.float32`` is not a Python float, has no ``__dict__``, and the
    fingerprint records nothing for it."""

    def __init__(self):
        self.mean = np.float32(0)

    def __call__(self, sample):
        image, mask = sample
        value = image.numpy().astype(np.float32).mean()
        self.mean = np.float32(0.9) * self.mean + np.float32(0.1) * value
        return image - float(self.mean), mask


class _ClassLevelStats:
    """A mutable class attribute (``stats = {...}`` in the class body) updated through
    ``self.stats[...]``: the fingerprint walks the instance ``__dict__`` only."""

    stats = {"sum": 0.0, "n": 0}

    def __call__(self, sample):
        image, mask = sample
        self.stats["sum"] += float(image.float().mean())
        self.stats["n"] += 1
        return image - self.stats["sum"] / self.stats["n"], mask


class _DataWrite:
    """A running mean in a tensor, updated through ``.data`` (no ``_version`` bump; the
    fingerprint keeps id, shape and version of tensors, not their values)."""

    def __init__(self):
        self.mean = torch.zeros(3)

    def __call__(self, sample):
        image, mask = sample
        self.mean.data.mul_(0.9).add_(0.1 * image.float().mean(dim=(1, 2)))
        return image - self.mean.view(3, 1, 1), mask


def _default_argument_stats(sample, _stats={"sum": 0.0, "n": 0}):  # noqa: B006 - the attack
    """State in a mutable default argument (``__defaults__`` is not walked)."""
    image, mask = sample
    _stats["sum"] += float(image.float().mean())
    _stats["n"] += 1
    return image - _stats["sum"] / _stats["n"], mask


class _RunningNorm:
    def __init__(self):
        self.total, self.count = torch.zeros(3), 0

    def apply(self, sample):
        image, mask = sample
        self.total = self.total + image.float().mean(dim=(1, 2))
        self.count += 1
        return image - (self.total / self.count).view(3, 1, 1), mask


class _ReseededJitter:
    """Brightness jitter whose generator is reseeded from the crop it just transformed ("mix
    the sample into the seed"): generators are left out of the fingerprint, so the next
    sample's jitter is a function of this crop."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, sample):
        image, mask = sample
        out = image * (0.8 + 0.4 * torch.rand((), generator=self.generator))
        self.generator.manual_seed(int(image.double().sum() * 1e6) % (2 ** 63))
        return out, mask


def _float32_running_mean():
    return _Float32RunningMean()


def _class_level_stats():
    _ClassLevelStats.stats = {"sum": 0.0, "n": 0}
    return _ClassLevelStats()


def _data_write():
    return _DataWrite()


def _default_argument():
    return _default_argument_stats


def _bound_method():
    return _RunningNorm().apply          # state in __self__, which is not walked


def _reseeded_generator():
    return _ReseededJitter()


@pytest.mark.parametrize("make", [_float32_running_mean, _class_level_stats, _data_write,
                                  _default_argument, _bound_method, _reseeded_generator])
def test_post_crop_state_outside_the_fingerprint_is_refused(make):
    """Round 2's fix fingerprints the post-crop stage's attributes, closures and containers
    around each call.  Each stage here carries a statistic of earlier crops into later samples
    -- including crops that covered other images' private regions, which then reach every
    later step, while the accountant composes w = q*p as if a region could only reach the
    steps whose crop covers it -- and each is accepted: the state sits in a numpy float32
    scalar, a class attribute, a tensor written through ``.data``, a default argument, the
    ``__self__`` of a bound method, or a generator reseeded from the crop.  (The README's
    exception is "outside its own attributes (globals, files)"; all of these are the stage's
    own.)  Fix: walk ``__self__``, ``__defaults__``/``__kwdefaults__`` and the class ``__dict__``;
    fingerprint numpy scalars and tensor values (bytes or a hash), and generators' state
    *changes other than by drawing* (or refuse manual_seed/set_state in the stage)."""
    if not post_crop_refused(make(), dataset=TinySegData(24, SIZE)):
        pytest.fail("a post-crop stage whose output depends on earlier samples was accepted")


# --- finding 7: a post-crop stage reaching a data set through a closure or a bound method -------
class _PasteFrom:
    """Copy-paste augmentation: blends a crop with an image of the training set."""

    def __init__(self, dataset):
        self.dataset = dataset

    def apply(self, sample):
        image, mask = sample
        other = self.dataset[0][0][:, :image.shape[1], :image.shape[2]]
        return 0.5 * image + 0.5 * other, mask


def _closure_over_a_paster():
    paster = _PasteFrom(TinySegData(24, SIZE))
    return lambda sample: paster.apply(sample)


def _bound_method_of_a_paster():
    return _PasteFrom(TinySegData(24, SIZE)).apply


@pytest.mark.parametrize("make", [_closure_over_a_paster, _bound_method_of_a_paster])
def test_a_post_crop_stage_that_reads_training_images_is_refused_however_it_is_wrapped(make):
    """``inspect_post_crop`` refuses a stage holding a data set (round 1) -- but (a) inside a
    closure the refusal is swallowed: the closure walk is wrapped in ``except ValueError`` (for
    empty cells), and ``TransformNotAllowedError`` *is* a ValueError; (b) a bound method's
    ``__self__`` is never walked.  ``post_crop_transform=lambda s: paster.apply(s)`` or
    ``=paster.apply`` pastes uncropped pixels of another training image into every sample:
    that image's private region reaches every step (not w = q*p of them).  The plain object
    ``post_crop_transform=paster`` is refused (control below).  Fix: catch ValueError only
    around ``cell.cell_contents``; walk ``__self__``."""
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    try:
        loader = CropDPDataLoader.from_data_loader(_loader(), crop=CROP, private_region=REGION,
                                                   post_crop_transform=make())
        next(iter(loader))
    except SAFE_ERRORS:
        return  # refused: safe
    pytest.fail("a post-crop stage that blends in uncropped training images was accepted")


# --- finding 8: a hard-linked copy of the data set is "other files" -----------------------------
def test_a_hard_linked_copy_of_the_images_is_one_record_per_image(tmp_path):
    """``record_key`` of our data sets is ``os.path.realpath`` of the image file.  A second
    tree of hard links to the same files (``cp -al``, ``rsync --link-dest``, DVC / git-annex
    checkouts with hardlink cache) has other real paths: ``ConcatDataset([DTD(a), DTD(b)])``
    over the same inodes passes ``check_unique_records``, every image is two records (q and
    the sensitivity 2C of one record both underestimated, as in round 2 finding 4).  Fix: key
    files by ``(st_dev, st_ino)`` (os.stat), which also covers symlinks."""
    from classification_data import write_dtd

    from patchdp_opacus.classification.datasets import DTD
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    a = write_dtd(tmp_path / "a", per_class=4, sizes=((32, 32),))
    b = tmp_path / "b"
    for path in a.rglob("*"):
        target = b / path.relative_to(a)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    both = ConcatDataset([DTD(a, "train", 1, image_size=(32, 32), min_side=32),
                          DTD(b, "train", 1, image_size=(32, 32), min_side=32)])
    assert os.stat(both.datasets[0].paths[0]).st_ino == os.stat(both.datasets[1].paths[0]).st_ino
    with pytest.raises(ValueError):
        CropDPDataLoader.from_data_loader(DataLoader(both, batch_size=2), crop=(12, 12),
                                          private_region=(3, 3), image_sizes=[(32, 32)])


# --- controls: what the fixes must keep working --------------------------------------------------
class _Stateless:
    def __init__(self, scale):
        self.scale = scale

    def apply(self, sample):
        image, mask = sample
        return image * self.scale, mask


def test_controls_dp_loop_stateless_stages_and_refusals_that_work():
    # the DP loop with prototypes written from *public* constants, and a plain DP loop
    torch.manual_seed(0)
    model = TinySegNet()
    engine, (gsm, opt, loader) = _private(model)
    _dp_pass(gsm, opt, loader)
    assert engine.get_epsilon(1e-3) > 0 and len(engine.accountant) == len(loader)
    from patchdp_opacus.plugin.loader import CropDPDataLoader
    from patchdp_opacus.plugin.transforms import TransformNotAllowedError
    from patchdp_opacus.segmentation.augment import build_transforms

    # stateless post-crop stages: a bound method of a stateless object, config-built steps
    for stage in (_Stateless(0.5).apply,
                  build_transforms([{"tv.ColorJitter": {"brightness": 0.3, "contrast": 0.3}},
                                    {"A.RandomBrightnessContrast": {"p": 1.0}},
                                    {"A.CLAHE": {"p": 1.0}}])):
        data = TinySegData(24, SIZE)
        data.images = (data.images * 255).to(torch.uint8)
        loader = CropDPDataLoader.from_data_loader(_loader(dataset=data), crop=CROP,
                                                   private_region=REGION,
                                                   post_crop_transform=stage)
        assert sum(len(b[0]) for b in loader) == 6 * len(loader)
    # what already works: a plain object holding a data set; an in-place write after the step
    with pytest.raises(TransformNotAllowedError):
        CropDPDataLoader.from_data_loader(_loader(), crop=CROP, private_region=REGION,
                                          post_crop_transform=_PasteFrom(TinySegData(24, SIZE)))
    model = _Prototypes()
    engine, (dp_model, opt, loader) = _private(model)
    with pytest.raises(SAFE_ERRORS):
        for x, y in loader:
            opt.zero_grad()
            logits = dp_model(x)
            per_image_ce()(logits, y).backward()
            opt.step()
            _write_prototypes(model, logits, y)
