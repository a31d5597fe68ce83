"""``CropDPDataLoader``: fixed-size DP batches whose samples are cropped by the loader.

Each step draws ``B`` distinct records uniformly without replacement (``q = B / N``) and,
per record, a uniform crop origin over the padded image (see
:mod:`patchdp_opacus.plugin.sampler` and :mod:`patchdp_opacus.plugin.crop`).  The crop
intersects a worst-case private region with probability at most
``p = spec.inclusion_probability``, so the patch-level accountant composes steps with the
effective sampling rate ``w = q * p`` (Theorem 2).

The user's dataset keeps its own (inspected) transforms; the loader's crop is applied after
them, to the transformed sample, so declared image sizes are post-transform sizes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from patchdp_opacus.plugin.crop import (
    DEFAULT_IGNORE_INDEX,
    CroppingDataset,
    image_size_of,
    token_moduli,
)
from patchdp_opacus.plugin.sampler import (
    DistributedFixedSizeBatchSampler,
    FixedSizeBatchSampler,
)
from patchdp_opacus.plugin.transforms import inspect_dataset
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
        spec: the :class:`~patchdp_opacus.privacy.spec.PatchPrivacySpec` (crop, region, image
            sizes) that both this loader and the accountant use.
        steps_per_epoch: default ``round(N / B)``.
        generator / seed: source of batch indices and crop origins (``seed`` makes a fresh
            ``torch.Generator``); default: a generator seeded from torch's global RNG.
        secure: draw indices and crop origins from the OS CSPRNG (:mod:`secrets`); this does
            not cover Opacus' noise.
        distributed: every rank draws the same global batch (``seed`` required, shared by all
            ranks) and yields its ``B / world_size`` slice; needs ``torch.distributed``
            initialised.
        ignore_index: padding value of masks (default 255).
        **dataloader_kwargs: other ``DataLoader`` arguments; ``shuffle``, ``sampler``,
            ``batch_sampler`` and ``drop_last`` are refused.

    Attributes: ``spec``, ``crop`` (``CropGeometry``), ``private_region``, ``image_sizes``,
    ``batch_size`` (``B``), ``sample_rate`` (``q = B / N``), ``inclusion_probability``
    (``p``), ``effective_sample_rate`` (``q * p``), ``steps_per_epoch`` (= ``len(loader)``),
    ``unchecked_transforms`` (= ``spec.unchecked_transforms``).  Poisson sampling is not
    offered: Opacus' ``poisson_sampling=True`` would feed plain indices to the cropping dataset,
    which refuses them.
    """

    def __init__(self, dataset, *, batch_size: int, spec: PatchPrivacySpec,
                 steps_per_epoch: int | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, secure: bool = False, distributed: bool = False,
                 num_workers: int = 0, collate_fn=None, ignore_index=DEFAULT_IGNORE_INDEX,
                 **dataloader_kwargs: Any):
        for key, why in _REFUSED.items():
            if key in dataloader_kwargs:
                raise TypeError(f"CropDPDataLoader does not accept {key}=: {why}")
        if "batch_size" in dataloader_kwargs:  # pragma: no cover - keyword-only above
            raise TypeError("batch_size given twice")
        if not isinstance(spec, PatchPrivacySpec):
            raise TypeError(f"spec must be a PatchPrivacySpec, got {type(spec).__name__}")
        num_samples = len(dataset)
        moduli = token_moduli(spec.crop, spec.image_sizes)
        if distributed:
            if secure:
                raise ValueError("secure=True is not supported with distributed=True: all ranks "
                                 "must draw the same global batch from a shared seed")
            if seed is None:
                raise ValueError("distributed=True needs seed=<int>, the same on every rank, so "
                                 "that all ranks draw the same global batch")
            if generator is not None:
                raise ValueError("distributed=True draws from seed; do not pass a generator")
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("distributed=True needs an initialised torch.distributed "
                                   "process group")
            batch_sampler = DistributedFixedSizeBatchSampler(
                num_samples, batch_size, dist.get_world_size(), dist.get_rank(), seed,
                steps_per_epoch, origin_moduli=moduli)
        else:
            generator = _make_generator(generator, seed, secure)
            batch_sampler = FixedSizeBatchSampler(num_samples, batch_size, steps_per_epoch,
                                                  generator, secure, origin_moduli=moduli)
        cropping = dataset if isinstance(dataset, CroppingDataset) and dataset.spec is spec \
            else CroppingDataset(dataset, spec, ignore_index=ignore_index)
        super().__init__(cropping, batch_sampler=batch_sampler, num_workers=num_workers,
                         collate_fn=collate_fn, generator=batch_sampler.generator,
                         **dataloader_kwargs)
        self.spec = spec
        self.distributed = bool(distributed)
        self.secure = bool(secure)
        # DataLoader sets batch_size=None when given a batch_sampler and forbids setting it
        # afterwards; it only reads it for iterable datasets.  Expose B, the global batch size.
        object.__setattr__(self, "batch_size", batch_sampler.global_batch_size)
        logger.info("CropDPDataLoader: N=%d, B=%d, %d steps/epoch, crop %s, padding %s, "
                    "pad_if_needed=%s, image sizes %s, q=%.6g, p=%.6g, q*p=%.6g%s",
                    num_samples, self.batch_size, len(self), spec.crop.crop_size,
                    spec.crop.padding, spec.crop.pad_if_needed, list(spec.image_sizes),
                    self.sample_rate, self.inclusion_probability, self.effective_sample_rate,
                    ", secure (OS CSPRNG) indices and origins" if secure else "")

    # -- what the accountant needs ---------------------------------------------------------
    @property
    def crop(self) -> CropGeometry:
        return self.spec.crop

    @property
    def private_region(self):
        return self.spec.region

    @property
    def image_sizes(self) -> tuple:
        return self.spec.image_sizes

    @property
    def unchecked_transforms(self) -> tuple:
        return self.spec.unchecked_transforms

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
                         group_size: int = 1, allow_unchecked_transforms: bool = False,
                         generator: torch.Generator | None = None, seed: int | None = None,
                         secure: bool = False, distributed: bool = False,
                         steps_per_epoch: int | None = None,
                         ignore_index=DEFAULT_IGNORE_INDEX) -> "CropDPDataLoader":
        """Wrap a user's ``DataLoader`` (no random crop in its pipeline).

        Keeps its dataset, batch size (as ``B``), ``collate_fn``, ``num_workers``,
        ``pin_memory``, ``worker_init_fn``, ``timeout``, ``multiprocessing_context``,
        ``prefetch_factor``, ``persistent_workers`` and (unless ``generator``/``seed``/
        ``secure`` is given) its ``generator``; its sampler/shuffle/drop_last are replaced.
        Runs the transform inspection (:func:`~patchdp_opacus.plugin.transforms.inspect_dataset`)
        and records transforms accepted by ``allow_unchecked_transforms`` in the spec.

        ``crop``: int, ``(h, w)`` or :class:`CropGeometry` (then ``padding``/``pad_if_needed``
        must be left at their defaults).  ``image_sizes``: default ``dataset.image_sizes`` if
        present, else ``dataset.size_of(i)`` for every index, else every sample is loaded once
        (a warning is logged).
        """
        dataset = data_loader.dataset
        if isinstance(dataset, CroppingDataset):
            raise ValueError("data_loader already crops for patch-level DP (CropDPDataLoader); "
                             "wrap the original loader instead")
        padding = (0, 0) if padding is None else padding
        if isinstance(crop, CropGeometry):
            if CropGeometry(crop.crop_size, padding).padding != (0, 0) or pad_if_needed:
                raise ValueError("crop is a CropGeometry: set padding/pad_if_needed in it, not "
                                 "as separate arguments")
            geometry = crop
        else:
            geometry = CropGeometry(crop, padding, pad_if_needed)
        batch_size = data_loader.batch_size
        if batch_size is None:
            batch_size = getattr(data_loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError("cannot tell the batch size of data_loader (batch_size=None and its "
                             "batch_sampler has no batch_size); build CropDPDataLoader directly")
        report = inspect_dataset(dataset, allow_unchecked=allow_unchecked_transforms)
        if image_sizes is None:
            image_sizes = scan_image_sizes(dataset)
        spec = PatchPrivacySpec(geometry, private_region, image_sizes, group_size=group_size,
                                unchecked_transforms=tuple(report.unchecked))
        kwargs = {k: getattr(data_loader, k) for k in _CARRIED if hasattr(data_loader, k)}
        if kwargs.get("num_workers", 0) > 0:
            kwargs["prefetch_factor"] = data_loader.prefetch_factor
        else:
            kwargs.pop("persistent_workers", None)
        if generator is None and seed is None and not secure and not distributed:
            generator = data_loader.generator
        return cls(dataset, batch_size=batch_size, spec=spec, steps_per_epoch=steps_per_epoch,
                   generator=generator, seed=seed, secure=secure, distributed=distributed,
                   ignore_index=ignore_index, **kwargs)


def _sample_image(sample):
    if isinstance(sample, dict):
        return sample["image"]
    if isinstance(sample, (tuple, list)):
        return sample[0]
    return sample


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
    return sorted({image_size_of(_sample_image(dataset[i])) for i in range(len(dataset))})
