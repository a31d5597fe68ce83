"""Loader-owned resampling transforms through the real CropDPDataLoader: tokens carry exact,
uniform parameter draws (chi-square over the declared grid, identified from the loader's own
outputs), fresh per step, epoch and worker; the samples are the resampling of the drawn theta;
huge draws survive BatchMemoryManager; undeclared sizes raise; make_private trains with the
transform and accounts its p."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager, wrap_data_loader
from PIL import Image
from scipy.stats import chisquare
from torch.utils.data import DataLoader, Dataset

from patchdp_opacus.plugin.crop import CroppingDataset, token_theta
from patchdp_opacus.plugin.engine import PrivacyEngine
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.plugin.resample import resample, resample_sample
from patchdp_opacus.plugin.sampler import (
    WORD,
    DistributedFixedSizeBatchSampler,
    FixedSizeBatchSampler,
    TransformToken,
)
from patchdp_opacus.privacy import CropGeometry, PatchPrivacySpec, Rectangle
from patchdp_opacus.privacy.geometric import (
    RandomResizedCrop,
    RandomScaleCrop,
    Resize,
)
from tests.plugin_helpers import TinySegData, TinySegNet, per_image_ce

ALPHA = 1e-4  # chi-square acceptance level; every run is seeded, so deterministic
MASK_OFFSET = 1000


def coord(size):
    """(image [1, H, W] float64, mask [H, W] int64): pixel (y, x) holds y * W + x + 1."""
    h, w = size
    image = torch.arange(1, h * w + 1, dtype=torch.float64).reshape(1, h, w)
    return image, image[0].long() + MASK_OFFSET


class CoordScenes(Dataset):
    """Sample ``i`` is the coordinate image of size ``sizes[i % len(sizes)]`` and its mask."""

    def __init__(self, sizes, n):
        self.sizes = [tuple(s) for s in sizes]
        self.n = n
        self.image_sizes = list(self.sizes)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return coord(self.sizes[i % len(self.sizes)])


TRANSFORMS = {
    "scale-bilinear-aa": RandomScaleCrop((4, 5), (0.75, 1, 1.25)),
    "scale-padded": RandomScaleCrop((6, 6), (0.5, 1), padding=(1, 0), pad_if_needed=True),
    "rrc": RandomResizedCrop((4, 4), scale=(0.3, 1), grid=(2, 2)),
    "resize-crop": Resize((12, 14), crop=(5, 5)),
}
SIZES = [(9, 11), (10, 8)]


def lookup(transform, size):
    """Output bytes -> (thetas giving that output, their total probability): distinct thetas
    that give identical samples are merged (the test then checks their summed frequency)."""
    image, mask = coord(size)
    classes: dict[bytes, list] = {}
    for theta, prob in transform.thetas(size):
        out = resample_sample((image, mask), transform, theta)
        key = out[0].numpy().tobytes() + out[1].numpy().tobytes()
        entry = classes.setdefault(key, [[], Fraction(0)])
        entry[0].append(theta)
        entry[1] += prob
    return classes


def key_of(image, mask):
    return image.numpy().tobytes() + mask.numpy().tobytes()


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_parameters_uniform_over_the_declared_grid_through_the_loader(name):
    """Chi-square over every output class of every declared size, with the exact theta
    probabilities, from the batches the real loader yields (moduli cover both sizes)."""
    transform = TRANSFORMS[name]
    spec = PatchPrivacySpec(transform, Rectangle(2, 2), SIZES)
    per_size = {s: lookup(transform, s) for s in SIZES}
    smallest = min(float(p) for classes in per_size.values() for _, p in classes.values())
    draws = int(10 / smallest)  # >= 5 expected per cell at each of the two sizes
    loader = CropDPDataLoader(CoordScenes(SIZES, 100), batch_size=100, spec=spec,
                              steps_per_epoch=-(-2 * draws // 100), seed=1)
    assert loader.batch_sampler.choice_modulus == transform.num_choices
    assert tuple(loader.batch_sampler.origin_moduli) == transform.draw_moduli(SIZES)[1:]
    seen = {s: Counter() for s in SIZES}
    for images, masks in loader:
        for image, mask in zip(images, masks):
            key = key_of(image, mask)
            size = next((s for s in SIZES if key in per_size[s]), None)
            assert size is not None, "the loader produced a sample no theta produces"
            seen[size][key] += 1
    for s in SIZES:
        keys = list(per_size[s])
        observed = np.array([seen[s][k] for k in keys])
        expected = np.array([float(per_size[s][k][1]) for k in keys]) * observed.sum()
        assert chisquare(observed, expected).pvalue > ALPHA, (name, s)


def test_chi_square_through_the_loader_sees_a_biased_choice_draw():
    """The uniformity check can fail: a sampler whose choice modulus is not a multiple of the
    number of scales (4 for 3 scales: the first scale twice as likely) is caught."""
    transform = TRANSFORMS["scale-bilinear-aa"]
    spec = PatchPrivacySpec(transform, Rectangle(2, 2), [SIZES[0]])
    loader = CropDPDataLoader(CoordScenes([SIZES[0]], 100), batch_size=100, spec=spec,
                              steps_per_epoch=20, seed=2)
    loader.batch_sampler.choice_modulus = 4
    classes = lookup(transform, SIZES[0])
    by_choice = Counter()
    for images, masks in loader:
        for image, mask in zip(images, masks):
            by_choice[classes[key_of(image, mask)][0][0].choice] += 1
    assert chisquare([by_choice[g] for g in range(3)]).pvalue < 1e-6


def thetas_of(loader, size, epochs=1):
    """The theta of every sample, per batch, identified from the loader's outputs."""
    classes = lookup(loader.transform, size)
    out = []
    for _ in range(epochs):
        for images, masks in loader:
            out.append(tuple(classes[key_of(i, m)][0][0] for i, m in zip(images, masks)))
    return out


def test_draws_fresh_per_step_and_epoch_and_the_same_with_workers():
    """Same seed: identical stream with num_workers=0 and 2 (the draws are made in the main
    process); no batch repeats another across steps, epochs or workers."""
    size = (9, 11)
    spec = PatchPrivacySpec(TRANSFORMS["rrc"], Rectangle(2, 2), [size])
    ds = CoordScenes([size], 12)  # every batch holds all 12 images: only the draws vary
    make = lambda workers, seed=5: CropDPDataLoader(  # noqa: E731
        ds, batch_size=12, spec=spec, steps_per_epoch=6, seed=seed, num_workers=workers)
    single, multi = thetas_of(make(0), size, epochs=2), thetas_of(make(2), size, epochs=2)
    assert single == multi
    assert len(set(single)) == len(single) == 12
    assert single[:6] != single[6:]                      # epochs differ
    assert thetas_of(make(0, seed=6), size) != single[:6]  # another seed, another stream


def test_samples_are_the_resampling_of_the_drawn_theta():
    """CroppingDataset applies exactly resample_sample for token_theta(draws): the function
    whose footprint the accountant uses."""
    spec = PatchPrivacySpec(TRANSFORMS["scale-padded"], Rectangle(2, 2), SIZES)
    loader = CropDPDataLoader(CoordScenes(SIZES, 8), batch_size=8, spec=spec, seed=3)
    tokens = loader.batch_sampler.draw_global_batch()
    assert all(isinstance(t, TransformToken) for t in tokens)
    for t in tokens:
        image, mask = loader.dataset[t]
        size = SIZES[t.index % 2]
        theta = token_theta(spec.crop, size, t.draws)
        ref_image, ref_mask = resample_sample(coord(size), spec.crop, theta)
        assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask)
        # the fields as a list (what numpy-splitting samplers pass) give the same sample
        again = loader.dataset[[t.index, *t.draws]]
        assert torch.equal(again[0], image)


class StubOptimizer:
    def signal_skip_step(self, do_skip=True):
        pass


def test_huge_draws_stay_exact_through_batch_memory_manager():
    """RandomResizedCrop's moduli exceed 2**64 here; Opacus splits batches with
    np.array_split, which would turn ints >= 2**63 into floats: TransformTokens pass as opaque
    objects, so the physical chunks are exactly the logical batches."""
    sizes = [(50, 70), (47, 71)]
    spec = PatchPrivacySpec(RandomResizedCrop((4, 4), grid=(8, 5)), Rectangle(2, 2), sizes)
    ds = CoordScenes(sizes, 20)
    moduli = CropDPDataLoader(ds, batch_size=10, spec=spec, seed=0).batch_sampler.origin_moduli
    assert max(moduli) > 2 ** 64 > WORD
    logical = [batch for batch in CropDPDataLoader(ds, batch_size=10, spec=spec, seed=0)]
    chunks = list(wrap_data_loader(data_loader=CropDPDataLoader(ds, batch_size=10, spec=spec,
                                                                seed=0),
                                   max_batch_size=3, optimizer=StubOptimizer()))
    assert len(chunks) == 4 * len(logical)
    for name in (0, 1):
        assert torch.equal(torch.cat([c[name] for c in chunks]),
                           torch.cat([b[name] for b in logical]))
    # draws in [2**63, 2**64): as tuples numpy rounds them to floats (refused by the dataset),
    # as TransformTokens they pass untouched
    token = TransformToken(3, 1, 2 ** 63 + 1, 5)
    as_tuples = np.array_split([(3, 1, 2 ** 63 + 1, 5)] * 2, 2)[0].tolist()[0]
    assert isinstance(as_tuples[2], float)
    with pytest.raises(TypeError, match="lost its exactness"):
        CroppingDataset(ds, spec)[as_tuples]
    assert np.array_split([token] * 2, 2)[0].tolist() == [token]


def test_secure_and_distributed_samplers_draw_transform_tokens():
    """secure=True draws every field (huge moduli too) from the OS; distributed ranks slice the
    same global batch of TransformTokens."""
    moduli = (2 ** 80 + 7, 3 * 2 ** 70 + 1)
    secure = FixedSizeBatchSampler(20, 5, steps_per_epoch=40, secure=True, origin_moduli=moduli,
                                   choice_modulus=7)
    tokens = [t for batch in secure for t in batch]
    assert all(isinstance(t, TransformToken) and 0 <= t.u_g < 7 and 0 <= t.u_y < moduli[0]
               and 0 <= t.u_x < moduli[1] for t in tokens)
    assert max(t.u_y for t in tokens) > 2 ** 64 and len({t.u_y for t in tokens}) == len(tokens)
    single = FixedSizeBatchSampler(20, 4, generator=torch.Generator().manual_seed(9),
                                   origin_moduli=moduli, choice_modulus=7)
    ranks = [DistributedFixedSizeBatchSampler(20, 4, 2, r, seed=9, origin_moduli=moduli,
                                              choice_modulus=7) for r in range(2)]
    for whole, a, b in zip(single, *ranks):
        assert a + b == whole and all(isinstance(t, TransformToken) for t in whole)


def test_tokens_that_lost_exactness_or_do_not_fit_are_refused():
    spec = PatchPrivacySpec(TRANSFORMS["rrc"], Rectangle(2, 2), [SIZES[0]])
    cropping = CroppingDataset(CoordScenes([SIZES[0]], 4), spec)
    with pytest.raises(TypeError, match="lost its exactness"):
        cropping[[0, 1.0, 2 ** 64 + 0.0, 3.0]]
    with pytest.raises(TypeError, match=r"takes \(index, u_g, u_y, u_x\)"):
        cropping[(0, 1, 2)]
    with pytest.raises(TypeError, match="Poisson"):
        cropping[0]
    crop_spec = PatchPrivacySpec(CropGeometry((4, 4)), Rectangle(2, 2), [SIZES[0]])
    with pytest.raises(TypeError, match=r"fixed-size crop takes \(index, u_y, u_x\)"):
        CroppingDataset(CoordScenes([SIZES[0]], 4), crop_spec)[TransformToken(0, 1, 2, 3)]


def test_undeclared_image_size_raises_before_resampling():
    spec = PatchPrivacySpec(TRANSFORMS["scale-bilinear-aa"], Rectangle(2, 2), [(9, 11)])
    loader = CropDPDataLoader(CoordScenes([(9, 11), (12, 13)], 4), batch_size=4, spec=spec,
                              seed=0)
    with pytest.raises(ValueError, match=r"image of size \(height=12, width=13\).*\[\(9, 11\)\]"):
        next(iter(loader))


class PilScenes(Dataset):
    """PIL RGB images and palette masks (what a dataset without ToTensor returns)."""

    image_sizes = [(9, 11)]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
        mask = Image.fromarray(rng.integers(0, 19, (9, 11), dtype=np.uint8)).convert("L")
        mask.putpalette([7] * 768)
        return image, mask


def test_pil_samples_are_resampled_with_torch_kernels_and_keep_their_mode():
    transform = RandomScaleCrop((4, 5), (0.75, 1.5), padding=(1, 1))
    spec = PatchPrivacySpec(transform, Rectangle(2, 2), [(9, 11)])
    cropping = CroppingDataset(PilScenes(), spec)
    token = TransformToken(2, 1, 5, 7)
    image, mask = cropping[token]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (5, 4)
    assert mask.mode == "P" and mask.getpalette()[:3] == [7, 7, 7]
    theta = token_theta(transform, (9, 11), token.draws)
    raw_image, raw_mask = PilScenes()[2]
    expected = resample(torch.from_numpy(np.array(raw_image)).permute(2, 0, 1), transform, theta)
    assert np.array_equal(np.asarray(image), expected.permute(1, 2, 0).numpy())
    assert np.array_equal(np.asarray(mask), resample(np.array(raw_mask), transform, theta,
                                                     is_mask=True))
    palette_image = raw_mask.copy()
    with pytest.raises(TypeError, match="palette"):
        resample(palette_image, transform, theta)
    with pytest.raises(TypeError, match="CMYK"):
        resample(raw_image.convert("CMYK"), transform, theta)


# --------------------------------------------------------------------------- the engine

def test_make_private_with_random_scale_crop_trains_and_accounts_its_p():
    torch.manual_seed(0)
    transform = RandomScaleCrop((12, 12), scale_range=(0.75, 1.5), pad_if_needed=True)
    model = TinySegNet()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
        data_loader=DataLoader(TinySegData(24, (20, 28)), batch_size=6), crop=transform,
        private_region=(2, 2), criterion=per_image_ce())
    assert loader.crop is transform and loader.transform is transform
    expected_p = transform.inclusion_probability([(20, 28)], Rectangle(2, 2)).value
    assert engine.accountant.inclusion_probability == loader.inclusion_probability == expected_p
    assert 0 < expected_p < 1
    criterion = per_image_ce()
    shapes = set()
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4,
                            optimizer=optimizer) as physical:
        for images, masks in physical:
            shapes.add((tuple(images.shape[1:]), tuple(masks.shape[1:])))
            optimizer.zero_grad()
            loss = criterion(model(images), masks)
            loss.backward()
            optimizer.step()
    assert shapes == {((3, 12, 12), (12, 12))}
    assert torch.isfinite(loss)
    assert len(engine.accountant) == len(loader) == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    report = engine.privacy_report(1e-5)
    assert report["geometry"]["crop"]["kind"] == "random_scale_crop"
    # what checkpoints store gives back the same claim
    assert PatchPrivacySpec.from_dict(report["geometry"]).same_geometry(loader.spec)
    assert report["geometry"]["inclusion_probability"] == expected_p
    assert 0 < report["epsilon_patch"] < report["epsilon_record"]


def test_make_private_with_epsilon_calibrates_for_the_transforms_p():
    transform = RandomResizedCrop((8, 8), scale=(0.2, 0.6), grid=(3, 3))
    zs = {}
    for level in ("patch", "record"):
        engine = PrivacyEngine()
        model = TinySegNet()
        engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TinySegData(24, (20, 28)), batch_size=6), crop=transform,
            private_region=(3, 3), target_epsilon=4.0, target_delta=1e-5, epochs=5,
            max_grad_norm=1.0, level=level)
        zs[level] = engine.noise_multiplier
    assert zs["patch"] < zs["record"]
    with pytest.raises(ValueError, match="set padding/pad_if_needed in it"):
        CropDPDataLoader.from_data_loader(DataLoader(TinySegData(8, (20, 28)), batch_size=4),
                                          crop=transform, padding=(1, 1), private_region=(2, 2))


def test_resize_for_images_stored_at_another_size():
    """DTD-like: images stored at 30x30, the loader resizes them to 45x45 and crops 15x15; the
    region is declared in stored pixels and p is the footprint p of that Resize."""
    transform = Resize((45, 45), crop=(15, 15))
    loader = CropDPDataLoader.from_data_loader(
        DataLoader(TinySegData(8, (30, 30)), batch_size=4), crop=transform,
        private_region=(3, 3), seed=0)
    images, masks = next(iter(loader))
    assert images.shape == (4, 3, 15, 15) and masks.shape == (4, 15, 15)
    assert loader.inclusion_probability == \
        transform.inclusion_probability([(30, 30)], Rectangle(3, 3)).value
