"""The loader's resampling: the kernels equal torch's, resampling from the footprint window equals
torchvision resizing the whole image (so the window is not too small), types are kept, and
parameter draws are exactly uniform over the declared grid."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from patchdp_opacus.plugin.resample import draw_theta, draw_uniforms, resample, resample_sample
from patchdp_opacus.privacy.geometric import (
    FixedCrop,
    RandomResizedCrop,
    RandomScaleCrop,
    Resize,
)
from patchdp_opacus.privacy.geometry import CropGeometry
from patchdp_opacus.privacy.interpolation import Interpolation, axis_taps

KERNELS = [("nearest", False), ("nearest-exact", False), ("bilinear", False),
           ("bicubic", False), ("bilinear", True), ("bicubic", True)]
MODES = {"nearest": InterpolationMode.NEAREST, "nearest-exact": InterpolationMode.NEAREST_EXACT,
         "bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def taps_matrix(interp, n_in, n_out):
    taps = axis_taps(interp, n_in, n_out)
    m = np.zeros((n_out, n_in))
    for k in range(n_out):
        m[k, taps.first[k]:taps.first[k] + taps.count[k]] += taps.weights[k, :taps.count[k]]
    return m


@pytest.mark.parametrize("mode, antialias", KERNELS)
def test_axis_taps_equal_torch_interpolate(mode, antialias):
    """One axis resized by torch (float64; a 3-pixel second axis kept as is: torch's
    antialiased kernels return zeros when that axis has 1 pixel) against our taps."""
    interp = Interpolation(mode, antialias)
    rng = np.random.default_rng(0)
    kw = {"mode": mode} if interp.is_nearest else \
        {"mode": mode, "align_corners": False, "antialias": antialias}
    for n_in in [*range(1, 26), 97, 1024]:
        outs = {1, 2, 3, 7, n_in // 3 + 1, n_in // 2 + 1, n_in + 1, 2 * n_in, 3 * n_in + 1,
                (3 * n_in) // 4 + 1}
        for n_out in sorted(outs):
            x = rng.random(n_in)
            ref = F.interpolate(torch.tensor(x)[None, None, :, None].repeat(1, 1, 1, 3),
                                size=(n_out, 3), **kw)[0, 0, :, 1].numpy()
            ours = taps_matrix(interp, n_in, n_out) @ x
            if interp.is_nearest:  # same float32 index arithmetic: identical
                np.testing.assert_array_equal(ours, ref, err_msg=f"{n_in}->{n_out}")
            else:
                np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12,
                                           err_msg=f"{n_in}->{n_out}")


def test_antialias_widens_the_support_by_the_scale():
    """Downscaling by r: the triangle reaches r source pixels either side of the centre (2r
    taps; for odd r the two end taps sit exactly where the kernel is 0 and are dropped), Keys'
    cubic 2r either side; without antialias the support stays 2 (bilinear) pixels."""
    for r in (2, 3, 4):
        taps = axis_taps(Interpolation("bilinear", True), 12 * r, 12)
        assert set(taps.count[3:-3]) == {2 * r - r % 2}
        plain = axis_taps(Interpolation("bilinear", False), 12 * r, 12)
        assert plain.count.max() <= 2   # odd r: source positions are integers, one tap
        cubic = axis_taps(Interpolation("bicubic", True), 12 * r, 12)
        assert set(cubic.count[3:-3]) == {4 * r - r % 2}


def _torchvision_scale_crop(x, transform, theta, mode, antialias, fill):
    plan_y, plan_x = transform.plans(tuple(x.shape[-2:]))[theta.choice]
    out = TF.resize(x, [plan_y.resized, plan_x.resized], interpolation=MODES[mode],
                    antialias=antialias)
    out = TF.pad(out, [plan_x.before, plan_y.before, plan_x.after, plan_y.after], fill=fill)
    return out[..., theta.origin_y:theta.origin_y + plan_y.out,
               theta.origin_x:theta.origin_x + plan_x.out]


@pytest.mark.parametrize("mode, antialias", KERNELS)
def test_scale_crop_from_the_window_equals_torchvision_on_the_whole_image(mode, antialias):
    transform = RandomScaleCrop((20, 24), scale_range=(0.25, 2), scale_step=0.25, padding=(2, 3),
                                pad_if_needed=True, interpolation=mode, antialias=antialias)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 37, 53, generator=gen, dtype=torch.float64)
    mask = torch.randint(0, 19, (1, 37, 53), generator=gen, dtype=torch.uint8)
    for _ in range(120):
        theta = draw_theta(transform, (37, 53), gen)
        ref = _torchvision_scale_crop(image, transform, theta, mode, antialias, 0)
        torch.testing.assert_close(resample(image, transform, theta), ref, rtol=0, atol=1e-12)
        ref = _torchvision_scale_crop(mask, transform, theta, "nearest", False, 255)
        assert torch.equal(resample(mask, transform, theta, is_mask=True), ref)


def test_random_resized_crop_equals_torchvision_resized_crop():
    transform = RandomResizedCrop((16, 12), grid=(6, 4))
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, 37, 53, generator=gen, dtype=torch.float64)
    for _ in range(150):
        theta = draw_theta(transform, (37, 53), gen)
        h, w = transform.boxes((37, 53))[theta.choice]
        ref = TF.resized_crop(image, theta.origin_y, theta.origin_x, h, w, [16, 12],
                              antialias=True)
        torch.testing.assert_close(resample(image, transform, theta), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(17, 19), 9])
def test_resize_then_crop_equals_torchvision(size):
    transform = Resize(size, "bicubic", crop=(8, 8))
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 13, 11, generator=gen, dtype=torch.float64)
    resized = TF.resize(image, [size] if isinstance(size, int) else list(size),
                        interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert tuple(resized.shape[-2:]) == transform.resized_size((13, 11))
    for theta, _ in transform.thetas((13, 11)):
        ref = resized[..., theta.origin_y:theta.origin_y + 8, theta.origin_x:theta.origin_x + 8]
        torch.testing.assert_close(resample(image, transform, theta), ref, rtol=0, atol=1e-12)


def test_fixed_crop_equals_the_existing_crop():
    from patchdp_opacus.plugin.crop import crop_array_like

    crop = CropGeometry((6, 9), (2, 1), pad_if_needed=True)
    image = torch.rand(3, 10, 5)
    for theta, _ in FixedCrop(crop).thetas((10, 5)):
        ref = crop_array_like(image, crop, (10, 5), theta[1:], 0)
        assert torch.equal(resample(image, crop, theta), ref)


def test_types_dtypes_and_samples():
    transform = RandomScaleCrop((8, 8), (0.75, 1.5), padding=(3, 3))
    theta = (1, 2, 3)
    img = torch.randint(0, 256, (3, 12, 14), dtype=torch.uint8)
    out = resample(img, transform, theta)
    ref = resample(img.double(), transform, theta).round().clamp(0, 255).to(torch.uint8)
    assert out.dtype == torch.uint8 and (out.int() - ref.int()).abs().max() <= 1
    hwc = img.permute(1, 2, 0).numpy()
    out_np = resample(hwc, transform, theta)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (8, 8, 3)
    np.testing.assert_array_equal(out_np, out.permute(1, 2, 0).numpy())
    half = resample(img.half(), transform, theta)
    assert half.dtype == torch.float16
    mask = torch.randint(0, 19, (12, 14), dtype=torch.int64)
    image_out, mask_out, label = resample_sample((img.float(), mask, 7), transform, theta)
    assert label == 7 and mask_out.dtype == torch.int64
    assert set(mask_out.unique().tolist()) <= set(mask.unique().tolist()) | {255}
    d = resample_sample({"mask": mask, "image": img}, transform, theta)
    assert list(d) == ["mask", "image"] and torch.equal(d["mask"], mask_out)
    with pytest.raises(ValueError, match="spatial size"):
        resample_sample((img, mask[:5]), transform, theta)
    with pytest.raises(ValueError, match="outside"):
        resample(img, transform, (0, 99, 0))


def test_draw_uniforms_is_exact_beyond_one_word():
    gen = torch.Generator().manual_seed(3)
    big = 3 * 2 ** 70 + 1
    draws = [draw_uniforms([big, 5], gen) for _ in range(3000)]
    assert all(0 <= u < big and 0 <= v < 5 for u, v in draws)
    # the low and high parts of a uniform draw below 3 * 2**70 + 1 are uniform
    assert chisquare(np.bincount([u % 7 for u, _ in draws], minlength=7)).pvalue > 1e-3
    assert chisquare(np.bincount([u * 3 // big for u, _ in draws], minlength=3)).pvalue > 1e-3
    again = torch.Generator().manual_seed(3)
    assert [draw_uniforms([big, 5], again) for _ in range(3000)] == draws
    assert all(0 <= u < 11 for u in draw_uniforms([11] * 20, secure=True))


def _theta_probabilities(transform, size):
    return dict(transform.thetas(size))


@pytest.mark.parametrize("sizes", [[(9, 11)], [(9, 11), (12, 7)]])
def test_theta_draws_are_uniform_over_the_grid(sizes):
    """Chi-square over every (choice, origin) with its exact probability, for draws from a torch
    generator through the moduli of the declared sizes."""
    transform = RandomScaleCrop((5, 6), (0.75, 1, 1.5), pad_if_needed=True)
    gen = torch.Generator().manual_seed(4)
    size = sizes[-1]
    probs = _theta_probabilities(transform, size)
    n = 40 * len(probs)
    seen = Counter(draw_theta(transform, size, gen, image_sizes=sizes) for _ in range(n))
    assert set(seen) <= set(probs)
    keys = sorted(probs)
    observed = np.array([seen[k] for k in keys])
    expected = np.array([float(probs[k]) * n for k in keys])
    assert chisquare(observed, expected).pvalue > 1e-3


def test_chi_square_sees_a_biased_modulus():
    """The uniformity test can fail: reducing draws from a range that is not a multiple of the
    origin count (here 1.5 times it) is caught."""
    transform = RandomScaleCrop((5, 6), (1,))
    (plan_y, _), = transform.plans((9, 11))
    n_y = plan_y.num_origins
    gen = torch.Generator().manual_seed(5)
    u = torch.randint(0, n_y + n_y // 2, (4000,), generator=gen)
    counts = np.bincount([transform.theta_from_draws((9, 11), (0, int(v), 0)).origin_y
                          for v in u], minlength=n_y)
    assert chisquare(counts).pvalue < 1e-6


def test_draws_are_fresh_and_reproducible():
    transform = RandomResizedCrop((8, 8), grid=(3, 3))
    a = [draw_theta(transform, (30, 40), torch.Generator().manual_seed(9)) for _ in range(2)]
    assert a[0] == a[1]
    gen = torch.Generator().manual_seed(9)
    seq = [draw_theta(transform, (30, 40), gen) for _ in range(50)]
    assert seq[0] == a[0] and len(set(seq)) > 30
    assert len({draw_theta(transform, (30, 40), secure=True) for _ in range(50)}) > 30


def test_every_theta_is_reachable_and_nothing_else():
    transform = RandomScaleCrop((3, 4), (0.5, 1), pad_if_needed=True)
    size = (5, 6)
    moduli = transform.draw_moduli([size])
    reached = {transform.theta_from_draws(size, draws)
               for draws in itertools.product(*(range(m) for m in moduli))}
    assert reached == set(_theta_probabilities(transform, size))
