"""The crop operation and CropDPDataLoader, checked through the real loader.

Images encode coordinates: pixel (y, x) holds ``y * W + x + 1`` (0 is the padding fill), so
the first non-zero pixel of a crop reveals where the crop was cut.
"""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from torch.utils.data import DataLoader, Dataset

from patchdp_opacus.plugin.crop import CroppingDataset, crop_sample, token_moduli
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.plugin.sampler import FixedSizeBatchSampler
from patchdp_opacus.plugin.transforms import TransformNotAllowedError
from patchdp_opacus.privacy import Circle, CropGeometry, PatchPrivacySpec

ALPHA = 1e-4  # chi-square acceptance level; all runs are seeded, so deterministic
MASK_OFFSET = 1000


def coord_image(h, w):
    return torch.arange(1, h * w + 1, dtype=torch.int64).reshape(1, h, w)


class CoordDataset(Dataset):
    """``n`` samples ``(image [1, H, W] int64, mask [H, W] = image + 1000)``; sample ``i`` has
    size ``sizes[i % len(sizes)]``."""

    def __init__(self, sizes, n):
        self.sizes = [tuple(s) for s in sizes]
        self.n = n
        self.images = {s: coord_image(*s) for s in self.sizes}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = self.images[self.sizes[i % len(self.sizes)]]
        return img, img[0] + MASK_OFFSET


def recover_origins(images, spec, size):
    """Padded crop origins (i, j) of a batch [B, 1, c_h, c_w] of crops of ``size`` images."""
    h, w = size
    top, _, left, _ = spec.crop.pad_offsets(size)
    cw = images.shape[-1]
    flat = images[:, 0].flatten(1)
    first = (flat > 0).int().argmax(1)  # first non-fill pixel, row-major
    assert bool((flat.gather(1, first[:, None]) > 0).all()), "crop entirely in padding"
    r, c = first // cw, first % cw
    y, x = (flat.gather(1, first[:, None])[:, 0] - 1).div(w, rounding_mode="floor"), \
        (flat.gather(1, first[:, None])[:, 0] - 1) % w
    return torch.stack([y + top - r, x + left - c], 1)


def reference_crop(size, spec, origin):
    top, bottom, left, right = spec.crop.pad_offsets(size)
    ch, cw = spec.crop.crop_size
    padded = F.pad(coord_image(*size), (left, right, top, bottom), value=0)
    i, j = origin
    return padded[..., i:i + ch, j:j + cw]


def hit_table(spec, size):
    """hit[i, j]: the crop at padded origin (i, j) meets the region at spec's worst placement."""
    ay, ax = spec.crop.axes(size)
    frame = np.zeros((ay.padded, ax.padded), dtype=bool)
    y, x = spec.inclusion.placement
    m = spec.region.mask()
    frame[y:y + m.shape[0], x:x + m.shape[1]] = m
    ch, cw = spec.crop.crop_size
    return np.array([[frame[i:i + ch, j:j + cw].any() for j in range(ax.num_origins)]
                     for i in range(ay.num_origins)])


CASES = {
    "no-padding": ((9, 13), CropGeometry((4, 6)), (2, 3)),
    "padding": ((8, 11), CropGeometry((5, 4), padding=(2, 3)), (3, 2)),
    "pad-if-needed": ((5, 12), CropGeometry((8, 6), padding=(0, 2), pad_if_needed=True), (2, 2)),
    "mask-region": ((10, 12), CropGeometry((4, 5), padding=(1, 1)), Circle(4)),
}


def draw_origins(spec, size, draws, seed=0):
    n = 100
    loader = CropDPDataLoader(CoordDataset([size], n), batch_size=n, spec=spec,
                              steps_per_epoch=draws // n, seed=seed)
    origins = []
    for images, masks in loader:
        o = recover_origins(images, spec, size)
        origins.append(o)
    return torch.cat(origins).numpy(), images, masks, o


@pytest.mark.parametrize("case", list(CASES))
def test_origins_uniform_and_inclusion_matches_p(case):
    size, geometry, region = CASES[case]
    spec = PatchPrivacySpec(geometry, region, [size])
    draws = 12000
    origins, images, masks, last = draw_origins(spec, size, draws)
    ay, ax = spec.crop.axes(size)
    assert origins[:, 0].min() >= 0 and origins[:, 0].max() < ay.num_origins
    assert origins[:, 1].min() >= 0 and origins[:, 1].max() < ax.num_origins
    # exact content: every crop of the last batch equals the padded image's window
    for b in range(len(images)):
        assert torch.equal(images[b], reference_crop(size, spec, last[b].tolist()))
    # uniform over all (S_y + 1)(S_x + 1) origins
    counts = np.zeros((ay.num_origins, ax.num_origins), dtype=np.int64)
    np.add.at(counts, (origins[:, 0], origins[:, 1]), 1)
    assert counts.size == spec.crop.num_origins(size)
    if counts.size > 1:
        assert stats.chisquare(counts.ravel()).pvalue > ALPHA
    # frequency of hitting the worst-case placement vs p (Clopper-Pearson 99.9 %)
    hits = int(hit_table(spec, size)[origins[:, 0], origins[:, 1]].sum())
    ci = stats.binomtest(hits, draws).proportion_ci(confidence_level=0.999, method="exact")
    p = spec.inclusion_probability
    assert ci.low <= p <= ci.high
    assert not ci.low <= p / 2 <= ci.high  # the check does reject a wrong p
    if geometry.padding != (0, 0):  # p ignoring the padding is wrong too
        unpadded = PatchPrivacySpec(CropGeometry(geometry.crop_size, (0, 0),
                                                 geometry.pad_if_needed), region, [size])
        assert not ci.low <= unpadded.inclusion_probability <= ci.high


class TaggedSizes(CoordDataset):
    """``(image, k)``: a classification-style sample whose label is the size's position."""

    def __getitem__(self, i):
        k = i % len(self.sizes)
        return self.images[self.sizes[k]], k


def test_mixed_sizes_exact_moduli_and_per_size_uniform():
    sizes = [(9, 13), (10, 12)]
    spec = PatchPrivacySpec(CropGeometry((4, 6)), (2, 2), sizes)
    assert token_moduli(spec.crop, sizes) == (42, 56)  # lcm(6, 7), lcm(8, 7)
    loader = CropDPDataLoader(TaggedSizes(sizes, 100), batch_size=50, spec=spec,
                              steps_per_epoch=160, seed=1)
    assert loader.batch_sampler.origin_moduli == (42, 56)
    origins = {k: [] for k in range(len(sizes))}
    for images, tags in loader:
        for k, s in enumerate(sizes):
            origins[k].append(recover_origins(images[tags == k], spec, s))
    for k, s in enumerate(sizes):
        o = torch.cat(origins[k]).numpy()
        ay, ax = spec.crop.axes(s)
        counts = np.zeros((ay.num_origins, ax.num_origins), dtype=np.int64)
        np.add.at(counts, (o[:, 0], o[:, 1]), 1)
        assert stats.chisquare(counts.ravel()).pvalue > ALPHA


def test_masks_padded_with_255_images_with_0():
    size = (6, 7)
    spec = PatchPrivacySpec(CropGeometry((6, 6), padding=(2, 2)), (1, 1), [size])
    loader = CropDPDataLoader(CoordDataset([size], 8), batch_size=8, spec=spec,
                              steps_per_epoch=20, seed=3)
    saw_padding = False
    for images, masks in loader:
        pad = images[:, 0] == 0
        saw_padding |= bool(pad.any())
        assert bool((masks[pad] == 255).all())
        assert bool((masks[~pad] == images[:, 0][~pad] + MASK_OFFSET).all())
        assert masks.dtype == torch.int64 and images.dtype == torch.int64
    assert saw_padding


def test_sample_formats_keep_types():
    geom = CropGeometry((4, 4), padding=(1, 1))
    size = (5, 6)
    img_np = np.arange(1, 31, dtype=np.uint8).reshape(5, 6, 1).repeat(3, axis=2)
    mask_np = np.full((5, 6), 3, dtype=np.uint8)
    out_img, out_mask = crop_sample((img_np, mask_np), geom, 0, 0, image_sizes=[size])
    assert isinstance(out_img, np.ndarray) and out_img.shape == (4, 4, 3)
    assert out_mask.shape == (4, 4) and out_mask.dtype == np.uint8
    assert (out_img[0] == 0).all() and (out_mask[0] == 255).all() and (out_mask[1:, 1:] == 3).all()
    assert (out_img[1, 1] == 1).all()

    pil_img = Image.fromarray(img_np)
    pil_mask = Image.fromarray(mask_np, mode="L")
    pi, pm = crop_sample((pil_img, pil_mask), geom, 0, 0)
    assert isinstance(pi, Image.Image) and pi.size == (4, 4) and pi.mode == "RGB"
    assert np.array_equal(np.asarray(pi), out_img) and np.array_equal(np.asarray(pm), out_mask)
    pal = pil_mask.convert("P")
    pal.putpalette([7] * 768)
    pp = crop_sample((pil_img, pal), geom, 0, 0)[1]
    assert pp.mode == "P" and pp.getpalette()[:3] == [7, 7, 7] and np.asarray(pp)[0, 0] == 255

    img_t = torch.rand(3, 5, 6)
    out, label = crop_sample((img_t, 4), geom, 2, 3)  # classification: label untouched
    assert label == 4 and out.shape == (3, 4, 4)
    out, label = crop_sample((img_t, torch.tensor(2)), geom, 2, 3)
    assert label.ndim == 0 and int(label) == 2
    assert crop_sample(img_t[0], geom, 2, 3).shape == (4, 4)  # bare [H, W] image
    d = crop_sample({"mask": torch.zeros(5, 6, dtype=torch.long), "image": img_t}, geom, 0, 0)
    assert list(d) == ["mask", "image"] and d["mask"][0, 0] == 255 and d["image"][0, 0, 0] == 0

    from torchvision import tv_tensors
    ti, tm = crop_sample((tv_tensors.Image(img_t), tv_tensors.Mask(torch.zeros(5, 6))), geom, 0, 0)
    assert type(ti) is tv_tensors.Image and type(tm) is tv_tensors.Mask


def test_crop_errors():
    geom = CropGeometry((4, 4), padding=(1, 1))
    img = torch.zeros(3, 5, 6)
    with pytest.raises(ValueError, match=r"\(height=5, width=6\).*\(7, 8\)"):
        crop_sample(img, geom, 0, 0, image_sizes=[(7, 8)])
    for u in (0, 1):  # a bool mask cannot hold the ignore index: refused even when this crop
        with pytest.raises(TypeError, match="uint8"):  # (u = 1) does not reach the border
            crop_sample((img, torch.zeros(5, 6, dtype=torch.bool)), geom, u, u)
    with pytest.raises(TypeError, match="uint8"):
        crop_sample((img, np.zeros((5, 6), dtype=np.int8)), geom, 1, 1)
    bool_mask = torch.zeros(5, 6, dtype=torch.bool)  # fine when the geometry never pads
    assert crop_sample((img, bool_mask), CropGeometry((4, 4)), 1, 1)[1].dtype == torch.bool
    with pytest.raises(ValueError, match="does not match the image size"):
        crop_sample((img, torch.zeros(4, 6, dtype=torch.long)), geom, 0, 0)
    with pytest.raises(ValueError, match="pad_if_needed"):
        crop_sample(torch.zeros(3, 2, 2), CropGeometry((4, 4)), 0, 0)
    with pytest.raises(ValueError, match="pad_if_needed"):  # crop larger than a declared size
        PatchPrivacySpec(CropGeometry((10, 4)), (1, 1), [(8, 8)])
    spec = PatchPrivacySpec(geom, (1, 1), [(5, 6)])
    with pytest.raises(TypeError, match="Poisson"):
        CroppingDataset(CoordDataset([(5, 6)], 3), spec)[0]


def test_undeclared_image_size_raises_in_loader():
    spec = PatchPrivacySpec(CropGeometry((3, 3)), (1, 1), [(6, 6)])
    loader = CropDPDataLoader(CoordDataset([(6, 6), (7, 9)], 4), batch_size=4, spec=spec, seed=0)
    with pytest.raises(ValueError, match=r"image of size \(height=7, width=9\).*\[\(6, 6\)\]"):
        next(iter(loader))


def test_refused_arguments_and_attributes():
    spec = PatchPrivacySpec(CropGeometry((3, 3)), (1, 1), [(6, 6)])
    ds = CoordDataset([(6, 6)], 40)
    for kw in ({"shuffle": True}, {"drop_last": True}, {"sampler": None}):
        with pytest.raises(TypeError, match=next(iter(kw))):
            CropDPDataLoader(ds, batch_size=8, spec=spec, **kw)
    with pytest.raises(ValueError, match="either generator or seed"):
        CropDPDataLoader(ds, batch_size=8, spec=spec, seed=1, generator=torch.Generator())
    loader = CropDPDataLoader(ds, batch_size=8, spec=spec, seed=0)
    assert loader.batch_size == 8 and len(loader) == loader.steps_per_epoch == 5
    assert loader.sample_rate == pytest.approx(8 / 40)
    assert loader.inclusion_probability == spec.inclusion_probability
    assert loader.effective_sample_rate == pytest.approx(8 / 40 * spec.inclusion_probability)
    assert loader.crop == spec.crop and loader.image_sizes == ((6, 6),)
    assert loader.private_region == spec.region and loader.spec is spec
    assert len(list(loader)) == 5 and all(len(x) == 8 for x, _ in loader)


def collect(loader, epochs=1):
    return [[t.clone() for t in batch] for _ in range(epochs) for batch in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_same_seed_identical_epochs_differ():
    size = (9, 13)
    spec = PatchPrivacySpec(CropGeometry((4, 6)), (2, 2), [size])
    make = lambda seed: CropDPDataLoader(CoordDataset([size], 30), batch_size=6, spec=spec,  # noqa
                                         seed=seed)
    a = make(7)
    e1, e2 = collect(a), collect(a)
    b = make(7)
    assert same(e1, collect(b)) and same(e2, collect(b))
    assert not same(e1, e2)
    o1 = torch.cat([recover_origins(x, spec, size) for x, _ in e1])
    o2 = torch.cat([recover_origins(x, spec, size) for x, _ in e2])
    assert not torch.equal(o1, o2)
    assert not same(e1, collect(make(8)))


def test_workers_do_not_repeat_crops_and_match_single_process():
    size = (9, 13)
    spec = PatchPrivacySpec(CropGeometry((4, 6)), (2, 2), [size])
    ds = CoordDataset([size], 12)  # every batch holds all 12 images: only crops vary
    single = CropDPDataLoader(ds, batch_size=12, spec=spec, steps_per_epoch=6, seed=5)
    multi = CropDPDataLoader(ds, batch_size=12, spec=spec, steps_per_epoch=6, seed=5,
                             num_workers=2)
    s, m = collect(single, 2), collect(multi, 2)
    assert same(s, m)
    seqs = [tuple(map(tuple, recover_origins(x, spec, size).tolist())) for x, _ in m]
    assert len(set(seqs)) == len(seqs)  # workers and epochs never repeat an origin sequence


class SizedDataset(CoordDataset):
    def size_of(self, i):
        return self.sizes[i % len(self.sizes)]


class DeclaredDataset(CoordDataset):
    @property
    def image_sizes(self):
        return self.sizes


def test_from_data_loader_keeps_settings_and_finds_sizes(caplog):
    def collate(batch):
        return torch.utils.data.default_collate(batch)

    def init(worker_id):
        pass

    user = DataLoader(CoordDataset([(6, 7)], 20), batch_size=5, shuffle=True, drop_last=True,
                      collate_fn=collate, worker_init_fn=init, pin_memory=False, timeout=0)
    with pytest.raises(TransformNotAllowedError, match="collate_fn: .*collate"):
        CropDPDataLoader.from_data_loader(user, crop=4, private_region=(2, 2), seed=0,
                                          image_sizes=[(6, 7)])
    with caplog.at_level(logging.WARNING, logger="patchdp_opacus.plugin.loader"):
        dp = CropDPDataLoader.from_data_loader(user, crop=4, private_region=(2, 2), seed=0,
                                               allow_unchecked_transforms=["collate"])
    assert "loading all 20 samples" in caplog.text
    assert dp.unchecked_transforms == (
        "test_crop_loader.test_from_data_loader_keeps_settings_and_finds_sizes.<locals>.collate",)
    assert dp.image_sizes == ((6, 7),) and dp.batch_size == 5 and len(dp) == 4
    assert dp.collate_fn is collate and dp.worker_init_fn is init and dp.num_workers == 0
    assert dp.dataset.dataset is user.dataset
    assert dp.crop == CropGeometry((4, 4))
    x, y = next(iter(dp))
    assert x.shape == (5, 1, 4, 4) and y.shape == (5, 4, 4)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="patchdp_opacus.plugin.loader"):
        a = CropDPDataLoader.from_data_loader(
            DataLoader(SizedDataset([(6, 7), (8, 8)], 4), batch_size=2),
            crop=CropGeometry((4, 4), padding=(1, 0)), private_region=(1, 1))
        b = CropDPDataLoader.from_data_loader(
            DataLoader(DeclaredDataset([(6, 7), (8, 9)], 4), batch_size=2), crop=(4, 5),
            padding=(1, 1), private_region=(1, 1))
    assert caplog.text == ""
    with pytest.raises(ValueError, match="set padding/pad_if_needed in it"):
        CropDPDataLoader.from_data_loader(
            DataLoader(DeclaredDataset([(6, 7)], 4), batch_size=2),
            crop=CropGeometry((4, 4)), padding=1, private_region=(1, 1))
    assert a.image_sizes == ((6, 7), (8, 8)) and a.crop.padding == (1, 0)
    assert b.image_sizes == ((6, 7), (8, 9)) and b.crop == CropGeometry((4, 5), (1, 1))
    # the inclusion probability is the worst case over the declared sizes
    assert b.inclusion_probability == max(
        PatchPrivacySpec(b.crop, (1, 1), [s]).inclusion_probability for s in b.image_sizes)


def test_from_data_loader_generator_reproducible_only_when_given():
    """The user's DataLoader generator (usually seeded for shuffling) is not inherited: the
    secret draws come from OS entropy, with a warning; a generator given explicitly is used."""
    def make(loader_generator=None, generator=None):
        return CropDPDataLoader.from_data_loader(
            DataLoader(DeclaredDataset([(6, 7)], 10), batch_size=3, generator=loader_generator),
            crop=4, private_region=1, generator=generator)

    with pytest.warns(UserWarning, match="generator is not used"):
        a = collect(make(torch.Generator().manual_seed(4)))
    with pytest.warns(UserWarning, match="generator is not used"):
        b = collect(make(torch.Generator().manual_seed(4)))
    assert not same(a, b)
    assert same(collect(make(generator=torch.Generator().manual_seed(4))),
                collect(make(generator=torch.Generator().manual_seed(4))))


class TinyImages(Dataset):
    def __init__(self, n, size):
        g = torch.Generator()
        g.manual_seed(0)
        self.x = torch.rand(n, 3, *size, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_batch_memory_manager_and_opacus_make_private():
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    spec = PatchPrivacySpec(CropGeometry((8, 8)), (2, 2), [(12, 10)])
    ds = TinyImages(32, (12, 10))
    loader = CropDPDataLoader(ds, batch_size=8, spec=spec, seed=0)
    reference = collect(CropDPDataLoader(ds, batch_size=8, spec=spec, seed=0), epochs=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False)
    assert isinstance(dp_loader.batch_sampler, FixedSizeBatchSampler)
    seen = []
    for _ in range(2):
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=3,
                                optimizer=optimizer) as physical:
            assert isinstance(physical.dataset, CroppingDataset)
            for x, y in physical:
                assert x.shape[1:] == (3, 8, 8) and 1 <= len(x) <= 3  # cropped from tokens
                seen.append((x.clone(), y.clone()))
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
    logical_steps = sum(steps for _, _, steps in engine.accountant.history)
    assert logical_steps == 2 * len(loader) == 8
    # the physical chunks are exactly the logical batches the loader draws from the same seed
    xs = torch.cat([x for x, _ in seen])
    assert torch.equal(xs, torch.cat([b[0] for b in reference]))


def test_secure_and_distributed_options():
    spec = PatchPrivacySpec(CropGeometry((3, 3), padding=(1, 1)), (1, 1), [(6, 6)])
    ds = CoordDataset([(6, 6)], 12)
    secure = CropDPDataLoader(ds, batch_size=4, spec=spec, secure=True)
    assert secure.batch_sampler.secure and secure.batch_sampler.generator is None
    for images, masks in secure:
        assert images.shape == (4, 1, 3, 3)
        recover_origins(images, spec, (6, 6))
    with pytest.raises(ValueError, match="secure"):
        CropDPDataLoader(ds, batch_size=4, spec=spec, secure=True, seed=1)
    with pytest.raises(RuntimeError, match="process group"):  # the seed is drawn and shared
        CropDPDataLoader(ds, batch_size=4, spec=spec, distributed=True)
    with pytest.raises(RuntimeError, match="process group"):
        CropDPDataLoader(ds, batch_size=4, spec=spec, distributed=True, seed=1)


def test_package_exports_loader():
    import patchdp_opacus

    assert patchdp_opacus.CropDPDataLoader is CropDPDataLoader
