"""``CropDPDataLoader``: fixed-size DP batches whose samples are cropped by the loader.

Each step draws ``B`` distinct records uniformly without replacement (``q = B / N``) and,
per record, a uniform crop origin over the padded image (see
:mod:`patchdp_opacus.plugin.sampler` and :mod:`patchdp_opacus.plugin.crop`).  The crop
intersects a worst-case private region with probability at most
``p = spec.inclusion_probability``, so the patch-level accountant composes steps with the
effective sampling rate ``w = q * p`` (Theorem 2).

Instead of a fixed-size crop the loader may own a resampling transform
(:mod:`patchdp_opacus.privacy.geometric`: ``RandomScaleCrop``, ``RandomResizedCrop``,
``Resize``): per record it draws ``theta`` (a choice -- scale, box shape -- and an origin,
exactly uniform over the transform's finite grid) and resamples the sample from the footprint
window of ``theta`` (:mod:`patchdp_opacus.plugin.resample`); ``p`` is then the probability
that this footprint meets the region (:mod:`patchdp_opacus.privacy.footprint`), computed from
the same function.  The private region is declared in the pixels of the images the loader
receives (after the dataset's own transforms, before the loader's resize).

The user's dataset keeps its own transforms; the loader's crop is applied after them, to the
transformed sample, so declared image sizes are post-transform sizes.  Every loader, however it
is built, inspects the dataset's object graph and its ``collate_fn``
(:mod:`patchdp_opacus.plugin.transforms`) before it yields anything.  Transforms that read the
whole image belong in ``post_crop_transform``, which the loader applies to each crop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import warnings
import weakref
from typing import Any, Callable, Hashable, Iterable

import torch
from torch.utils.data import DataLoader

from patchdp_opacus.plugin.crop import (
    DEFAULT_IGNORE_INDEX,
    CroppingDataset,
    choice_modulus,
    fixed_crop_of,
    image_size_of,
    sample_image,
    token_moduli,
)
from patchdp_opacus.plugin.sampler import (
    DistributedFixedSizeBatchSampler,
    FixedSizeBatchSampler,
)
from patchdp_opacus.plugin.transforms import (
    TransformNotAllowedError,
    inspect_collate,
    inspect_dataset,
    inspect_post_crop,
)
from patchdp_opacus.privacy.geometric import GeometricTransform
from patchdp_opacus.privacy.geometry import CropGeometry
from patchdp_opacus.privacy.spec import PatchPrivacySpec

logger = logging.getLogger(__name__)

_REFUSED = {
    "shuffle": "every step draws a fresh uniform batch; there is no epoch order to shuffle",
    "sampler": "the loader owns sampling (fixed-size batches without replacement)",
    "batch_sampler": "the loader owns sampling (fixed-size batches without replacement)",
    "drop_last": "every batch has exactly batch_size samples",
}

#: DataLoader settings carried over by :meth:`CropDPDataLoader.from_data_loader`.
_CARRIED = ("collate_fn", "num_workers", "pin_memory", "timeout", "worker_init_fn",
            "multiprocessing_context", "persistent_workers", "pin_memory_device", "in_order")


def _make_generator(generator, seed, secure):
    if secure:
        if generator is not None or seed is not None:
            raise ValueError("secure=True draws indices and crop origins from the OS CSPRNG; "
                             "do not pass a generator or a seed")
        return None
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return generator


class CropDPDataLoader(DataLoader):
    """DataLoader for patch-level DP-SGD with loader-owned random crops.

    Args:
        dataset: map-style dataset whose samples are an image, ``(image, mask)``,
            ``(image, label)`` or a dict with ``"image"`` (see
            :func:`~patchdp_opacus.plugin.crop.crop_sample`); its images must have one of
            ``spec.image_sizes`` after the dataset's own transforms.
        batch_size: ``B``, the fixed (global) number of records per step.
        spec: the :class:`~patchdp_opacus.privacy.spec.PatchPrivacySpec` (crop or loader-owned
            transform, region, image sizes) that both this loader and the accountant use.
        steps_per_epoch: default ``round(N / B)``.
        generator / seed: source of batch indices and crop origins (``seed`` makes a fresh
            ``torch.Generator``).  Default: a generator seeded from the OS's entropy.  A known
            seed makes the draws reproducible -- and known to whoever knows it, which voids the
            amplification the accountant claims; it is recorded in :attr:`sampling_source`.
        secure: draw indices and crop origins from the OS CSPRNG (:mod:`secrets`) at every
            step.
        distributed: every rank draws the same global batch and yields its ``B / world_size``
            slice (``seed`` shared by all ranks; default: rank 0 draws one from the OS and
            broadcasts it); needs ``torch.distributed`` initialised.
        ignore_index: padding value of masks (default 255).
        post_crop_transform: optional function applied to each cropped sample (same structure
            as the dataset's samples, e.g. ``(image, mask)``) in the worker, after the crop.  It
            sees the crop only, so it may read the whole crop (contrast, per-crop
            normalisation, rotations of the crop); it must not carry state across samples.
        allow_unchecked_transforms: ``True`` or names of transforms / callables found in the
            dataset or ``collate_fn`` that the inspection cannot vouch for; they are recorded in
            ``spec.unchecked_transforms`` (privacy reports print them).
        augmentation_generator / augmentation_seed: source of the noise seeds when
            ``spec.augmentation`` is set (Gaussian-noise augmentation, added by this loader to
            every sample: :mod:`patchdp_opacus.plugin.augmentation`).  Default: a generator
            seeded from the OS's entropy, separate from the sampling generator (``secure``:
            the OS CSPRNG).  A known seed makes the noise reproducible -- and removable by
            whoever knows it, which voids the augmentation's amplification
            (:attr:`augmentation_source` says so).
        **dataloader_kwargs: other ``DataLoader`` arguments; ``shuffle``, ``sampler``,
            ``batch_sampler`` and ``drop_last`` are refused.

    Attributes: ``spec``, ``crop`` (``spec.crop``: a ``CropGeometry`` or the transform),
    ``transform`` (``spec.transform``), ``private_region``, ``image_sizes``,
    ``batch_size`` (``B``), ``sample_rate`` (``q = B / N``), ``inclusion_probability``
    (``p``), ``effective_sample_rate`` (``q * p``), ``steps_per_epoch`` (= ``len(loader)``),
    ``unchecked_transforms`` (= ``spec.unchecked_transforms``), ``sampling_source``.  Poisson
    sampling is not offered: Opacus' ``poisson_sampling=True`` would feed plain indices to the
    cropping dataset, which refuses them.

    Raises :class:`~patchdp_opacus.plugin.transforms.TransformNotAllowedError` when the dataset
    or ``collate_fn`` holds something the analysis does not cover.
    """

    def __init__(self, dataset, *, batch_size: int, spec: PatchPrivacySpec,
                 steps_per_epoch: int | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, secure: bool = False, distributed: bool = False,
                 num_workers: int = 0, collate_fn=None, ignore_index=DEFAULT_IGNORE_INDEX,
                 post_crop_transform: Callable | None = None,
                 allow_unchecked_transforms: bool | Iterable[str] = False,
                 augmentation_generator: torch.Generator | None = None,
                 augmentation_seed: int | None = None,
                 **dataloader_kwargs: Any):
        for key, why in _REFUSED.items():
            if key in dataloader_kwargs:
                raise TypeError(f"CropDPDataLoader does not accept {key}=: {why}")
        if "batch_size" in dataloader_kwargs:  # pragma: no cover - keyword-only above
            raise TypeError("batch_size given twice")
        if not isinstance(spec, PatchPrivacySpec):
            raise TypeError(f"spec must be a PatchPrivacySpec, got {type(spec).__name__}")
        if isinstance(dataset, CroppingDataset):
            if post_crop_transform is not None and post_crop_transform is not \
                    dataset.post_crop_transform:
                raise ValueError("dataset is already a CroppingDataset with its own "
                                 "post_crop_transform; pass the original dataset")
            post_crop_transform, dataset = dataset.post_crop_transform, dataset.dataset
        # one door: every loader inspects what runs before its crop and how batches are built
        check_unique_records(dataset)
        report = inspect_dataset(dataset, allow_unchecked=allow_unchecked_transforms)
        report.merge(inspect_collate(collate_fn, allow_unchecked=allow_unchecked_transforms))
        if post_crop_transform is not None:
            inspect_post_crop(post_crop_transform)
        unchecked = tuple(dict.fromkeys((*spec.unchecked_transforms, *report.unchecked)))
        if unchecked != spec.unchecked_transforms:
            spec = dataclasses.replace(spec, unchecked_transforms=unchecked)
        noise_seeds = spec.augmentation is not None
        if not noise_seeds and (augmentation_generator is not None
                                or augmentation_seed is not None):
            raise ValueError("augmentation_generator/augmentation_seed without Gaussian "
                             "augmentation in the spec (spec.augmentation is None)")
        if secure and (augmentation_generator is not None or augmentation_seed is not None):
            raise ValueError("secure=True draws the augmentation noise seeds from the OS CSPRNG; "
                             "do not pass augmentation_generator or augmentation_seed")
        noise_generator = _make_generator(augmentation_generator, augmentation_seed, False) \
            if noise_seeds else None
        self._augmentation_seeded = noise_generator is not None
        num_samples = len(dataset)
        moduli = token_moduli(spec.crop, spec.image_sizes)
        choices = choice_modulus(spec.crop, spec.image_sizes)
        if distributed:
            if secure:
                raise ValueError("secure=True is not supported with distributed=True: all ranks "
                                 "must draw the same global batch from a shared seed")
            if generator is not None:
                raise ValueError("distributed=True draws from seed; do not pass a generator")
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("distributed=True needs an initialised torch.distributed "
                                   "process group")
            self._seeded = seed is not None
            if seed is None:  # secret, shared: rank 0 draws it and tells the others
                shared = [secrets.randbits(63) if dist.get_rank() == 0 else None]
                dist.broadcast_object_list(shared, src=0)
                seed = shared[0]
            if noise_generator is not None:  # every rank noises its own slice: its own stream
                noise_generator.manual_seed(noise_generator.initial_seed() + dist.get_rank())
            batch_sampler = DistributedFixedSizeBatchSampler(
                num_samples, batch_size, dist.get_world_size(), dist.get_rank(), seed,
                steps_per_epoch, origin_moduli=moduli, choice_modulus=choices,
                noise_seeds=noise_seeds, noise_generator=noise_generator)
        else:
            self._seeded = seed is not None or generator is not None
            generator = _make_generator(generator, seed, secure)
            batch_sampler = FixedSizeBatchSampler(num_samples, batch_size, steps_per_epoch,
                                                  generator, secure, origin_moduli=moduli,
                                                  choice_modulus=choices, noise_seeds=noise_seeds,
                                                  noise_generator=noise_generator)
        cropping = CroppingDataset(dataset, spec, ignore_index=ignore_index,
                                   post_crop_transform=post_crop_transform)
        super().__init__(cropping, batch_sampler=batch_sampler, num_workers=num_workers,
                         collate_fn=collate_fn, generator=batch_sampler.generator,
                         **dataloader_kwargs)
        self.spec = spec
        self.inspection = report
        self._allow_unchecked = allow_unchecked_transforms
        self._built_generator = batch_sampler.generator
        ref = weakref.WeakMethod(self._reinspect)
        batch_sampler.on_iteration_start.append(lambda: ref() and ref()())
        self.distributed = bool(distributed)
        self.secure = bool(secure)
        # DataLoader sets batch_size=None when given a batch_sampler and forbids setting it
        # afterwards; it only reads it for iterable datasets.  Expose B, the global batch size.
        object.__setattr__(self, "batch_size", batch_sampler.global_batch_size)
        logger.info("CropDPDataLoader: N=%d, B=%d, %d steps/epoch, %s, image sizes %s, q=%.6g, "
                    "p=%.6g, q*p=%.6g%s%s", num_samples, self.batch_size, len(self),
                    spec.describe_geometry(), list(spec.image_sizes), self.sample_rate,
                    self.inclusion_probability, self.effective_sample_rate,
                    ", secure (OS CSPRNG) indices and origins" if secure else "",
                    "" if spec.augmentation is None else
                    f"; {spec.augmentation.describe()} added by the loader, TV = "
                    f"{spec.augmentation_tv:.6g}, noise seeds: {self.augmentation_source}")

    # -- what the accountant needs ---------------------------------------------------------
    @property
    def crop(self) -> CropGeometry | GeometricTransform:
        return self.spec.crop

    @property
    def transform(self) -> GeometricTransform:
        """The geometry behind the common transform interface (a crop as ``FixedCrop``)."""
        return self.spec.transform

    @property
    def private_region(self):
        return self.spec.region

    @property
    def image_sizes(self) -> tuple:
        return self.spec.image_sizes

    @property
    def unchecked_transforms(self) -> tuple:
        return self.spec.unchecked_transforms

    def _reinspect(self) -> None:
        """At the start of every pass: the dataset, collate and post-crop stage may have been
        changed since the constructor inspected them (``dataset.transform = ...``)."""
        report = inspect_dataset(self.dataset.dataset, allow_unchecked=self._allow_unchecked)
        report.merge(inspect_collate(self.collate_fn, allow_unchecked=self._allow_unchecked))
        if self.post_crop_transform is not None:
            inspect_post_crop(self.post_crop_transform)
        new = [n for n in report.unchecked if n not in self.spec.unchecked_transforms]
        if new:
            raise TransformNotAllowedError(
                f"the data pipeline changed after the loader was built: {new} are accepted by "
                f"allow_unchecked_transforms but not recorded in this loader's privacy spec; "
                f"build a new loader (make_private) after setting the transforms",
                name=new[0], where="dataset", verdict="unknown", reason="changed after build")

    @property
    def post_crop_transform(self):
        return self.dataset.post_crop_transform

    @property
    def sampling_source(self) -> str:
        """Where batch indices and crop origins come from (for privacy reports), read from the
        generator the sampler holds now."""
        if self.secure:
            return "OS CSPRNG (secrets) at every step"
        if self.batch_sampler.generator is not self._built_generator:
            return ("a generator set after the loader was built (e.g. Opacus' switch_generator): "
                    "reproducible, and not private if its seed is known")
        if self._seeded:
            return ("seeded generator: reproducible, and the sub-sampling and crop amplification "
                    "assume the seed stays secret")
        return "generator seeded from OS entropy"

    @property
    def augmentation_source(self) -> str | None:
        """Where the Gaussian augmentation noise comes from (None without augmentation)."""
        if self.spec.augmentation is None:
            return None
        if self.secure:
            return "OS CSPRNG (secrets) at every step"
        if self._augmentation_seeded:
            return ("seeded generator: reproducible, and the augmentation's amplification "
                    "assumes the seed stays secret")
        return "generator seeded from OS entropy (separate from the sampling generator)"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batch_sampler)

    @property
    def sample_rate(self) -> float:
        """``q = B / N`` (record-level sampling rate of one step)."""
        return self.batch_size / len(self.dataset)

    @property
    def inclusion_probability(self) -> float:
        """``p``: worst-case probability that a sample's crop intersects the private region."""
        return self.spec.inclusion_probability

    @property
    def effective_sample_rate(self) -> float:
        """``w = q * p`` (Theorem 2)."""
        return self.sample_rate * self.inclusion_probability

    # -- wrapping a user's loader ----------------------------------------------------------
    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, crop, private_region,
                         image_sizes=None, padding=(0, 0), pad_if_needed: bool = False,
                         group_size: int = 1,
                         allow_unchecked_transforms: bool | Iterable[str] = False,
                         generator: torch.Generator | None = None, seed: int | None = None,
                         secure: bool = False, distributed: bool = False,
                         steps_per_epoch: int | None = None,
                         ignore_index=DEFAULT_IGNORE_INDEX,
                         post_crop_transform: Callable | None = None,
                         gaussian_augmentation=None,
                         augmentation_seed: int | None = None) -> "CropDPDataLoader":
        """Wrap a user's ``DataLoader`` (no random crop in its pipeline).

        Keeps its dataset, batch size (as ``B``), ``collate_fn``, ``num_workers``,
        ``pin_memory``, ``worker_init_fn``, ``timeout``, ``multiprocessing_context``,
        ``prefetch_factor`` and ``persistent_workers``; its sampler/shuffle/drop_last and its
        generator are replaced (the draws come from OS entropy unless ``seed``/``generator``
        is given here).
        The constructor runs the inspection and records what ``allow_unchecked_transforms``
        accepted in the spec.

        ``crop``: int, ``(h, w)`` or :class:`CropGeometry`, or a loader-owned transform
        (:class:`~patchdp_opacus.privacy.geometric.RandomScaleCrop`, ``RandomResizedCrop``,
        ``Resize``; a ``FixedCrop`` is stored as its ``CropGeometry``).  For a
        ``CropGeometry`` or a transform ``padding``/``pad_if_needed`` must be left at their
        defaults (they are part of it).  ``image_sizes``: default ``dataset.image_sizes`` if
        present, else ``dataset.size_of(i)`` for every index, else every sample is loaded once
        (a warning is logged); with a ``Resize`` these are the *stored* sizes, before it.
        ``gaussian_augmentation``: a :class:`~patchdp_opacus.privacy.GaussianAugmentation`
        (noise std in pixel units, channels) the loader adds to every sample; it becomes part
        of the spec, so the accountant can claim its TV; ``augmentation_seed`` makes that noise
        reproducible (and not private if the seed is known).
        """
        dataset = data_loader.dataset
        if isinstance(dataset, CroppingDataset):
            raise ValueError("data_loader already crops for patch-level DP (CropDPDataLoader); "
                             "wrap the original loader instead")
        padding = (0, 0) if padding is None else padding
        if isinstance(crop, (CropGeometry, GeometricTransform)):
            if CropGeometry((1, 1), padding).padding != (0, 0) or pad_if_needed:
                raise ValueError(f"crop is a {type(crop).__name__}: set padding/pad_if_needed "
                                 f"in it, not as separate arguments")
            geometry = fixed_crop_of(crop) or crop
        else:
            geometry = CropGeometry(crop, padding, pad_if_needed)
        batch_size = data_loader.batch_size
        if batch_size is None:
            batch_size = getattr(data_loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError("cannot tell the batch size of data_loader (batch_size=None and its "
                             "batch_sampler has no batch_size); build CropDPDataLoader directly")
        if image_sizes is None:
            image_sizes = scan_image_sizes(dataset)
        spec = PatchPrivacySpec(geometry, private_region, image_sizes, group_size=group_size,
                                augmentation=gaussian_augmentation)
        kwargs = {k: getattr(data_loader, k) for k in _CARRIED if hasattr(data_loader, k)}
        if kwargs.get("num_workers", 0) > 0:
            kwargs["prefetch_factor"] = data_loader.prefetch_factor
        else:
            kwargs.pop("persistent_workers", None)
        if data_loader.generator is not None and generator is None and seed is None:
            msg = ("the DataLoader's generator is not used for the secret draws: batch indices "
                   "and crop origins come from OS entropy (a seeded shuffling generator would "
                   "make them known to whoever knows the seed, which voids the amplification). "
                   "Pass seed= or generator= to make_private / from_data_loader for "
                   "reproducible sampling")
            logger.warning(msg)
            warnings.warn(msg, stacklevel=2)
        return cls(dataset, batch_size=batch_size, spec=spec, steps_per_epoch=steps_per_epoch,
                   generator=generator, seed=seed, secure=secure, distributed=distributed,
                   ignore_index=ignore_index, post_crop_transform=post_crop_transform,
                   allow_unchecked_transforms=allow_unchecked_transforms,
                   augmentation_seed=augmentation_seed, **kwargs)


def record_key(dataset, index: int) -> Hashable:
    """What record ``index`` of a leaf data set *is*, so that two data set objects over the same
    images give equal keys.

    A data set that knows its records defines ``record_key(index)`` (our data sets: the image
    file's real path, or the generator's seed, split and index); a ``TensorDataset`` record is
    the memory of its first tensor's row; anything else is ``(id(dataset), index)`` -- then only
    repetitions of the same object are seen.  Copies of the pixels (``x.clone()``, a flipped
    copy saved to other files) are other records to any key: see the README's "What no check
    can see"."""
    own = getattr(dataset, "record_key", None)
    if callable(own):
        return own(index)
    if _is_torch_data(dataset, "TensorDataset"):
        rows = dataset.tensors[0]
        return ("memory", rows.untyped_storage().data_ptr(),
                rows.storage_offset() + int(index) * rows.stride(0))
    return ("object", id(dataset), int(index))


def file_record_key(dataset, files, index: int) -> tuple:
    """The :func:`record_key` of a data set whose record ``index`` is the image file
    ``files[index]``: the file itself, by device and inode (symlinks, hard links, other roots
    name one file), or by real path where the file system has no inode numbers; without a file
    list (``files`` None), the data set object and the index."""
    if files is None:
        return ("object", id(dataset), int(index))
    stat = os.stat(files[index])
    if stat.st_ino:
        return ("file", stat.st_dev, stat.st_ino)
    return ("file", os.path.realpath(files[index]))


def _is_torch_data(dataset, kind: str) -> bool:
    return type(dataset).__module__.startswith("torch.utils.data") and \
        type(dataset).__name__ == kind


def _records(dataset, indices):
    """``(key, leaf data set, leaf index)`` of each of ``dataset[indices]``, through ``Subset``
    and ``ConcatDataset`` down to the data sets underneath."""
    if _is_torch_data(dataset, "Subset"):
        yield from _records(dataset.dataset, [dataset.indices[i] for i in indices])
    elif _is_torch_data(dataset, "ConcatDataset"):
        bounds = [0, *dataset.cumulative_sizes]
        for child, lo, hi in zip(dataset.datasets, bounds[:-1], bounds[1:]):
            yield from _records(child, [i - lo for i in indices if lo <= i < hi])
    else:
        for i in indices:
            yield record_key(dataset, int(i)), dataset, int(i)


def check_unique_records(dataset) -> None:
    """Refuse a data set that holds one image in several records (``ConcatDataset([ds, ds])``,
    ``Subset(ds, idx * 2)``, two data set objects over the same files or tensors, an
    "augmented copy" of the same files): the accountant's ``q = B / N`` and sensitivity ``2C``
    assume that every image is one of the ``N`` records; a repeated image enters a batch more
    often and can enter it twice.  Records are compared by :func:`record_key`."""
    seen: dict = {}
    leaves: dict = {}
    for key, base, i in _records(dataset, range(len(dataset))):
        leaves[id(base)] = base
        if key in seen:
            (first, j) = seen[key]
            raise ValueError(
                f"record {i} of {type(base).__name__} is record {j} of "
                f"{type(first).__name__} again ({key!r}): a ConcatDataset of the same images "
                f"(the same data set twice, or a transformed copy), or a Subset with repeated "
                f"indices. The accountant's q = B/N and sensitivity 2C assume that each image "
                f"is one record. Remove the repetition (augment inside the loader instead of "
                f"copying; for longer epochs use steps_per_epoch or more epochs)")
        seen[key] = (base, i)
    _check_wrappers(list(leaves.values()))


def _inner_datasets(obj, depth: int = 3) -> list:
    """The data sets an object holds in its attributes (and theirs, ``depth`` levels)."""
    from torch.utils.data import Dataset

    found = []
    for value in (vars(obj).values() if hasattr(obj, "__dict__") else ()):
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, Dataset):
                found.append(item)
                if depth > 1:
                    found += _inner_datasets(item, depth - 1)
    return found


def _check_wrappers(leaves: list) -> None:
    """A custom wrapper (no ``record_key``) whose records cannot be compared is refused when
    it wraps a data set that another part of the same data set also reaches
    (``ConcatDataset([ds, MyFlip(ds)])``): its index map is unknown, so the repetition
    cannot be ruled out."""
    reached: dict = {}
    for leaf in leaves:
        for inner in [leaf, *_inner_datasets(leaf)]:
            reached.setdefault(id(inner), []).append(leaf)
    for leaf in leaves:
        if callable(getattr(leaf, "record_key", None)):
            continue
        for inner in _inner_datasets(leaf):
            others = [o for o in reached.get(id(inner), []) if o is not leaf]
            if others:
                raise ValueError(
                    f"{type(leaf).__name__} wraps a {type(inner).__name__} that another part of "
                    f"the data set ({type(others[0]).__name__}) also holds: if both hand out "
                    f"the same images, every such image is two records, which q = B/N and the "
                    f"sensitivity 2C do not cover, and {type(leaf).__name__}'s index map is "
                    f"unknown. Define record_key(i) on {type(leaf).__name__} (e.g. return "
                    f"record_key(self.dataset, j) for the record j it reads) so that repeats "
                    f"are checked, or remove the copy (augment inside the loader)")


def shared_records(first, second, limit: int = 3) -> list:
    """Up to ``limit`` :func:`record_key` values that are records of both data sets (e.g. a
    validation split that holds training images)."""
    keys = {key for key, _, _ in _records(first, range(len(first)))}
    found = []
    for key, _, _ in _records(second, range(len(second))):
        if key in keys and len(found) < limit:
            found.append(key)
    return found


def scan_image_sizes(dataset) -> list[tuple[int, int]]:
    """The distinct ``(H, W)`` of a dataset's (transformed) images.

    Uses ``dataset.image_sizes`` if present, else ``dataset.size_of(i)`` for every index, else
    loads every sample once (slow for large data sets: declare ``image_sizes`` instead).
    ``Subset`` is resolved to its parent's declaration (a superset: ``p`` is then
    conservative) when the subset itself declares nothing."""
    declared = getattr(dataset, "image_sizes", None)
    if declared is not None:
        return list(declared)
    size_of = getattr(dataset, "size_of", None)
    if callable(size_of):
        return sorted({tuple(int(v) for v in size_of(i)) for i in range(len(dataset))})
    parent = dataset
    while type(parent).__name__ == "Subset" and hasattr(parent, "dataset"):
        parent = parent.dataset
        if getattr(parent, "image_sizes", None) is not None:
            return list(parent.image_sizes)
    logger.warning("image_sizes not given and the dataset declares none (no image_sizes "
                   "attribute or size_of(i) method): loading all %d samples once to find the "
                   "image sizes; pass image_sizes=... to skip this", len(dataset))
    return sorted({image_size_of(sample_image(dataset[i])) for i in range(len(dataset))})
