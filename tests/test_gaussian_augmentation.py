"""The Gaussian-noise augmentation baseline as a training mechanism: the loader adds the noise
(the measured std is sigma_aug, in pixel units, before anything else sees the image), the
accountant claims w = q * TV only when the spec (read by the loader too) holds the noise, the
noise comes from a secret source, and the neighbour-pair audit still runs."""

import numpy as np
import pytest
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from plugin_helpers import TinySegNet, per_image_ce
from torch.utils.data import DataLoader, Dataset

from patchdp_opacus import PrivacyEngine
from patchdp_opacus.audit import audit_loader
from patchdp_opacus.plugin.accountant import PatchPLDAccountant, amplification
from patchdp_opacus.plugin.augmentation import AugmentationUnitsError, gaussian_noise
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.plugin.resample import resample
from patchdp_opacus.plugin.sampler import CropToken
from patchdp_opacus.privacy import (
    CropGeometry,
    GaussianAugmentation,
    PatchDPSGD,
    PatchPrivacySpec,
    Rectangle,
    Resize,
    calibrate_noise,
    epsilon,
    gaussian_augmentation_tv,
)
from patchdp_opacus.segmentation.datasets.base import SegmentationDataset

SIZE, CROP, REGION = (20, 28), (8, 10), (2, 2)
SIGMA = 40.0
DELTA = 1e-5


class Flat(Dataset):
    """``n`` uint8 images (3, H, W) of one grey value and masks; ``dtype`` to break the rule."""

    def __init__(self, n=24, value=100, dtype=torch.uint8, channels=3, size=SIZE):
        self.value, self.dtype, self.n, self.channels = value, dtype, n, channels
        self.image_sizes = {tuple(size)}
        self.size = size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.full((self.channels, *self.size), self.value, dtype=self.dtype)
        return image, (torch.arange(self.size[0] * self.size[1]).reshape(self.size) % 3)


def spec(sigma=SIGMA, channels=3, geometry=None):
    return PatchPrivacySpec(geometry or CropGeometry(CROP), Rectangle(*REGION), [SIZE],
                            augmentation=GaussianAugmentation(sigma, channels))


def test_the_loader_adds_noise_of_std_sigma_aug_in_pixel_units():
    loader = CropDPDataLoader(Flat(), batch_size=8, spec=spec(), seed=0)
    batches = [x for _ in range(2) for x, _ in loader]
    noise = torch.cat(batches) - 100.0  # pixel units: the image was a constant 100
    assert batches[0].dtype == torch.float32 and noise.numel() == 2 * 3 * 8 * 3 * 80
    assert noise.std().item() == pytest.approx(SIGMA, rel=0.03)
    assert abs(noise.mean().item()) < 3 * SIGMA / noise.numel() ** 0.5
    # fresh at every use: no two samples (of any step or epoch) share their noise
    flat = noise.flatten(1)
    assert torch.unique(flat[:, 0]).numel() == flat.shape[0]


def test_the_noise_comes_before_the_post_crop_stage_and_before_resampling():
    def normalise(sample):  # a post-crop normalisation must see the noisy pixels
        return (sample[0] - 100.0) / 50.0, sample[1]

    loader = CropDPDataLoader(Flat(), batch_size=4, spec=spec(), seed=0,
                              post_crop_transform=normalise)
    x, _ = next(iter(loader))
    seen = x * 50.0 + 100.0  # what the stage saw (it keeps no record: that is refused)
    assert seen.std().item() > SIGMA / 2
    assert x.std().item() == pytest.approx(SIGMA / 50.0, rel=0.15)

    # a resize in the loader: the noise is added to the stored image, then resampled
    stored = (40, 56)
    geometry = Resize(SIZE, crop=CROP)
    s = PatchPrivacySpec(geometry, Rectangle(*REGION), [stored],
                         augmentation=GaussianAugmentation(SIGMA, 3))
    data = Flat(size=stored)
    loader = CropDPDataLoader(data, batch_size=2, spec=s, seed=0)
    token = next(iter(loader.batch_sampler))[0]
    got = loader.dataset[token][0]
    theta = geometry.theta_from_draws(stored, token.draws)
    noisy = data[token.index][0].float() + gaussian_noise((3, *stored), SIGMA, token.noise_seed)
    assert torch.allclose(got, resample(noisy, geometry, theta), atol=1e-4)
    assert got.std().item() < SIGMA * 0.8  # the resize's low-pass: noise in stored units


@pytest.mark.parametrize("dataset,match", [
    (Flat(dtype=torch.float32), "uint8"),      # e.g. ToTensor's 0-1 floats, a normalisation
    (Flat(channels=1), "1 channel"),           # the TV was computed for 3 channels
])
def test_images_not_in_declared_pixel_units_are_refused(dataset, match):
    loader = CropDPDataLoader(dataset, batch_size=4, spec=spec(), seed=0)
    with pytest.raises(AugmentationUnitsError, match=match):
        next(iter(loader))


def test_noise_is_secret_unless_its_own_seed_is_given():
    def first(**kw):
        torch.manual_seed(0)
        return next(iter(CropDPDataLoader(Flat(), batch_size=4, spec=spec(), **kw)))[0]

    # the sampling seed (and torch's global seed) do not reproduce the noise
    a, b = first(seed=1), first(seed=1)
    assert not torch.equal(a, b)
    assert torch.equal(a.round() * 0, b.round() * 0)
    # its own seed does (and the report says so)
    c, d = first(seed=1, augmentation_seed=7), first(seed=1, augmentation_seed=7)
    assert torch.equal(c, d)
    loader = CropDPDataLoader(Flat(), batch_size=4, spec=spec(), seed=1, augmentation_seed=7)
    assert "seed stays secret" in loader.augmentation_source
    assert "OS entropy" in CropDPDataLoader(Flat(), batch_size=4, spec=spec()).augmentation_source
    secure = CropDPDataLoader(Flat(), batch_size=4, spec=spec(), secure=True)
    assert "OS CSPRNG" in secure.augmentation_source
    assert secure.batch_sampler.noise_generator is None
    assert (next(iter(secure))[0] - 100).std() > SIGMA / 2
    with pytest.raises(ValueError, match="OS CSPRNG"):
        CropDPDataLoader(Flat(), batch_size=4, spec=spec(), secure=True, augmentation_seed=1)


def test_a_token_without_noise_seed_is_refused_when_the_spec_adds_noise():
    loader = CropDPDataLoader(Flat(), batch_size=4, spec=spec(), seed=0)
    with pytest.raises(TypeError, match="noise_seed"):
        loader.dataset[CropToken(0, 1, 1)]


def _engine(level=None, sigma=SIGMA, augmentation=True, **kw):
    torch.manual_seed(0)
    model = TinySegNet()
    engine = PrivacyEngine()
    common = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  data_loader=DataLoader(Flat(), batch_size=6), criterion=per_image_ce(),
                  max_grad_norm=1.0, crop=CROP, private_region=REGION, seed=0,
                  gaussian_augmentation=GaussianAugmentation(sigma, 3) if augmentation else None,
                  **kw)
    if level is None:
        return engine, engine.make_private(noise_multiplier=1.0, **common)
    return engine, engine.make_private_with_epsilon(target_epsilon=4.0, target_delta=DELTA,
                                                    epochs=2, level=level, **common)


def _epoch(model, opt, loader):
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4,
                            optimizer=opt) as mem:  # noise seeds survive the split
        for x, y in mem:
            opt.zero_grad()
            per_image_ce()(model(x.float()), y).backward()
            opt.step()


def test_epsilon_under_gaussian_augmentation_is_theorem_2_with_w_q_tv():
    engine, (model, opt, loader) = _engine(sigma=1000.0)  # r = 255 sqrt(12) = 883
    _epoch(model, opt, loader)
    steps, q = len(engine.accountant), loader.sample_rate
    tv = gaussian_augmentation_tv(1000.0, REGION, 3)
    assert steps == len(loader) and 0 < tv < 1
    assert engine.accountant.amplification("gaussian_augmentation") == tv
    expected = epsilon(PatchDPSGD(1.0, q, tv, steps), DELTA)
    assert engine.get_epsilon(DELTA, level="gaussian_augmentation") == expected
    report = engine.privacy_report(DELTA)
    assert report["epsilon_gaussian_augmentation"] == expected
    assert report["augmentation_tv"] == tv and report["geometry"]["augmentation"]["tv"] == tv
    assert report["epsilon_patch"] == epsilon(PatchDPSGD(1.0, q, loader.inclusion_probability,
                                                         steps), DELTA)


def test_make_private_with_epsilon_calibrates_z_for_the_gaussian_augmentation_claim():
    engine, (model, opt, loader) = _engine(level="gaussian_augmentation", sigma=400.0)
    tv = gaussian_augmentation_tv(400.0, REGION, 3)
    steps = 2 * len(loader)
    assert engine.noise_multiplier == calibrate_noise(4.0, DELTA, loader.sample_rate, tv, steps)
    assert engine.target["level"] == "gaussian_augmentation"
    assert epsilon(PatchDPSGD(engine.noise_multiplier, loader.sample_rate, tv, steps),
                   DELTA) <= 4.0


def test_the_gaussian_augmentation_level_needs_the_noise_in_the_spec():
    with pytest.raises(ValueError, match="gaussian_augmentation"):
        _engine(level="gaussian_augmentation", augmentation=False)
    engine, (model, opt, loader) = _engine(augmentation=False)
    _epoch(model, opt, loader)
    with pytest.raises(ValueError, match="needs the Gaussian noise augmentation"):
        engine.get_epsilon(DELTA, level="gaussian_augmentation")
    assert "epsilon_gaussian_augmentation" not in engine.privacy_report(DELTA)
    with pytest.raises(ValueError, match="needs the Gaussian noise augmentation"):
        amplification(None, "gaussian_augmentation")


@pytest.mark.parametrize("other", [None, 2 * SIGMA])
def test_a_checkpoint_does_not_resume_under_other_noise(tmp_path, other):
    engine, (model, opt, loader) = _engine()
    _epoch(model, opt, loader)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=opt)
    engine2, (model2, opt2, _) = _engine(sigma=other or SIGMA, augmentation=other is not None)
    with pytest.raises(ValueError, match="differs"):
        engine2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    # and a run without the noise cannot continue as a run with it
    state = PatchPLDAccountant(spec(geometry=None))
    plain = PatchPLDAccountant(PatchPrivacySpec(CropGeometry(CROP), Rectangle(*REGION), [SIZE]))
    plain.step(noise_multiplier=1.0, sample_rate=0.25)
    with pytest.raises(ValueError, match="differs"):
        state.load_state_dict(plain.state_dict())


def test_reproducible_augmentation_noise_resumes_from_the_checkpoint(tmp_path):
    engine, (model, opt, loader) = _engine(augmentation_seed=3)
    _epoch(model, opt, loader)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=opt)
    state = torch.load(path, weights_only=False)
    assert "patchdp_augmentation_rng_state" in state
    following = next(iter(loader))[0]
    engine2, (model2, opt2, loader2) = _engine(augmentation_seed=99)
    engine2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    assert torch.equal(next(iter(loader2))[0], following)
    # a secret noise stream is never written to a checkpoint
    engine3, (model3, opt3, loader3) = _engine()
    engine3.save_checkpoint(path=tmp_path / "secret.pt", module=model3, optimizer=opt3)
    assert "patchdp_augmentation_rng_state" not in torch.load(tmp_path / "secret.pt",
                                                               weights_only=False)


class Scenes(SegmentationDataset):
    def __init__(self, n=6):
        super().__init__(None)
        self._sizes = [SIZE] * n

    def _load(self, index):
        g = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, *SIZE), generator=g, dtype=torch.uint8)
        return image, (image[0] // 86).long()


def test_the_neighbour_pair_audit_runs_with_the_noise():
    loader = CropDPDataLoader(Scenes(), batch_size=3, spec=spec(), seed=0)
    report = audit_loader(loader, trials=300, origin_draws=600, mirrors=False)
    assert report.passed, report.table()
    assert report.differing > 0 and report.outside == 0


def test_noise_seeds_are_uniform_62_bit_words():
    loader = CropDPDataLoader(Flat(n=50), batch_size=50, spec=spec(), seed=0)
    seeds = np.array([t.noise_seed for t in next(iter(loader.batch_sampler))], dtype=np.float64)
    assert seeds.min() >= 0 and seeds.max() < 2.0**62 and len(set(seeds)) == 50
    assert 0.3 < seeds.mean() / 2.0**62 < 0.7
