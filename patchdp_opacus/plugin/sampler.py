"""Fixed-size batch samplers that also draw each sample's crop (or transform) parameters.

Theorem 2 of the analysis assumes *fixed-size* batches drawn *uniformly without replacement*,
independently at every step: each step's batch is a uniformly random set of ``B`` distinct
indices out of ``N`` (not a shuffled partition of the epoch), so every record is in a given
batch with probability ``q = B / N`` and steps are independent.

Tokens
------
Every item a sampler yields carries the dataset index and the uniform random integers from
which the cropping dataset derives the sample's geometric parameters:

* a fixed-size crop: a :class:`CropToken` ``(index, u_y, u_x)``; the crop origin is
  ``origin_y = u_y mod (S_y + 1)`` (likewise ``x``; ``S_y + 1`` is the number of crop origins
  on that axis, see :class:`~patchdp_opacus.privacy.geometry.AxisGeometry`);
* a loader-owned transform with choices (random scale + crop, RandomResizedCrop, resize: see
  :mod:`patchdp_opacus.privacy.geometric`): a :class:`TransformToken` ``(index, u_g, u_y,
  u_x)``; ``theta = (u_g mod G, u_y mod n_y(g), u_x mod n_x(g))``
  (:meth:`~patchdp_opacus.privacy.geometric.GeometricTransform.theta_from_draws`).

With Gaussian-noise augmentation (a spec holding a
:class:`~patchdp_opacus.privacy.baselines.GaussianAugmentation`) every token also carries a
``noise_seed``: a uniform 62-bit word from a *separate* generator (:attr:`noise_generator`,
seeded from the OS's entropy unless the user seeds it; the OS CSPRNG with ``secure=True``), from
which the cropping dataset draws that sample's noise.  The noise is thus fresh at every use of a
sample, independent across workers and epochs, and reproducible only if the noise generator's
seed is known -- never from the sampling seed (:class:`NoisyCropToken`, and
:class:`TransformToken` with its ``noise_seed``).

Because the tokens are drawn here, in the main process, from the sampler's own generator:

* parameters never repeat across DataLoader workers or epochs (workers only execute tokens);
* a run with a seeded generator is reproducible, whatever ``num_workers`` is;
* they survive Opacus' ``BatchMemoryManager``, which rebuilds a plain ``DataLoader`` around the
  same ``dataset`` and ``batch_sampler`` and splits each batch with ``np.array_split``: a
  :class:`CropToken` becomes a list ``[index, u_y, u_x]`` (its draws are below ``2**62``, exact
  in int64; the cropping dataset accepts lists).  A :class:`TransformToken` is deliberately
  *not* a sequence: its draws may exceed ``2**63``, which numpy would turn into float64 and
  round; numpy keeps it as an opaque object.

Exactness: ``u`` is drawn uniformly from ``[0, M)`` by rejection sampling, so it is exactly
uniform (given uniform generator words).  The loader sets ``M`` per field to the least common
multiple of the counts it is reduced by (origin counts of every declared image size, and of
every choice), so ``theta`` is exactly uniform too.  A transform's moduli may exceed ``2**62``
(RandomResizedCrop's lcm over 40 box shapes has ~110 bits): :func:`draw_uniforms` draws them
exactly from several words.  For a fixed crop without moduli (or when the lcm exceeds
``2**62``) ``M = 2**62`` and the origin distribution is off uniform by at most
``(S + 1) / 2**62`` per origin (total variation), about ``5e-16`` for ``S + 1 = 2048``.  Batch
indices are drawn exactly as well (partial Fisher-Yates with exact uniform integers), unlike
``torch.randperm`` whose CPU draw reduces 32-bit words modulo ``n``.

Randomness sources
------------------
Amplification by sub-sampling and by cropping holds against an adversary who does *not* know
which records were in a batch and where they were cropped: the draws must be secret.  By
default they come from a ``torch.Generator`` seeded from the operating system's entropy
(attribute :attr:`generator`, replaceable, e.g. by Opacus' ``switch_generator``); a generator
seeded from a known number (``seed=`` of the loader) makes runs reproducible and is reported
as such -- the claim then assumes that the seed stays secret.  Exact uniform integers come
from 62-bit words ``torch.randint(0, 2**62)`` (torch reduces a 64-bit word modulo ``2**62``,
which is exact) and rejection.  ``secure=True`` draws indices and crop/transform parameters
from the operating system's CSPRNG (Python's :mod:`secrets`) for every step instead.

Logical batches
---------------
Every yielded batch gets a consecutive :attr:`FixedSizeBatchSampler.last_batch_id`, and every
new iteration over the sampler calls the functions in :attr:`on_iteration_start` first.  The
engine uses both to check that one noisy optimizer step releases exactly one logical batch,
also when ``BatchMemoryManager`` splits it into chunks and workers prefetch them
(:mod:`patchdp_opacus.plugin.integrity`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import BatchSampler

from patchdp_opacus.privacy.accounting import steps_per_epoch as steps_per_epoch_for

logger = logging.getLogger(__name__)

#: Width of one random word: ``torch.randint(0, 2**62)`` is exactly uniform (2**62 divides 2**64).
WORD_BITS = 62
WORD = 1 << WORD_BITS


class CropToken(NamedTuple):
    """What the sampler yields per sample for a fixed-size crop: dataset ``index`` and the
    crop-origin draws ``u_y``, ``u_x`` (uniform in ``[0, M_y)``, ``[0, M_x)``; origin =
    ``u mod (S + 1)``)."""

    index: int
    u_y: int
    u_x: int


class NoisyCropToken(NamedTuple):
    """A :class:`CropToken` with the seed of the sample's Gaussian augmentation noise
    (``0 <= noise_seed < 2**62``, exact in int64, so ``BatchMemoryManager`` keeps it)."""

    index: int
    u_y: int
    u_x: int
    noise_seed: int


@dataclass(frozen=True)
class TransformToken:
    """What the sampler yields per sample for a loader-owned transform: dataset ``index`` and
    the draws ``u_g``, ``u_y``, ``u_x`` (uniform in ``[0, M_g)``, ``[0, M_y)``, ``[0, M_x)``;
    ``theta = (u_g mod G, u_y mod n_y(g), u_x mod n_x(g))``).  Python ints of any size.

    Not a tuple on purpose (see the module docstring: numpy would turn draws ``>= 2**63``
    into floats); :attr:`draws` gives ``(u_g, u_y, u_x)``."""

    index: int
    u_g: int
    u_y: int
    u_x: int
    noise_seed: int | None = None  # Gaussian augmentation: the seed of this sample's noise

    @property
    def draws(self) -> tuple[int, int, int]:
        return self.u_g, self.u_y, self.u_x


def with_noise_seed(token, noise_seed: int):
    """``token`` with the seed of its sample's augmentation noise attached."""
    if isinstance(token, TransformToken):
        return dataclasses.replace(token, noise_seed=int(noise_seed))
    return NoisyCropToken(*(int(v) for v in token), int(noise_seed))


def uniform_below(bounds: Sequence[int], generator: torch.Generator | None) -> list[int]:
    """Exactly uniform integers ``r_i`` in ``[0, bounds_i)`` for each ``1 <= bounds_i <= 2**62``.

    Draws 62-bit words ``w`` from ``generator`` and accepts ``w < 2**62 - (2**62 mod b)``
    (the largest multiple of ``b``), returning ``w mod b``; rejected entries are re-drawn
    (probability ``< b / 2**62`` each).  Deterministic given the generator state."""
    if len(bounds) == 0:
        return []
    b = torch.as_tensor(list(bounds), dtype=torch.int64)
    if int(b.min()) < 1 or int(b.max()) > WORD:
        raise ValueError(f"bounds must lie in [1, 2**{WORD_BITS}], got {list(bounds)}")
    limit = WORD - torch.remainder(torch.full_like(b, WORD), b)
    out = torch.empty_like(b)
    todo = torch.arange(b.numel())
    while todo.numel():
        words = torch.randint(0, WORD, (todo.numel(),), generator=generator, dtype=torch.int64)
        ok = words < limit[todo]
        out[todo[ok]] = torch.remainder(words[ok], b[todo[ok]])
        todo = todo[~ok]
    return out.tolist()


def draw_uniforms(moduli: Sequence[int], generator: torch.Generator | None = None, *,
                  secure: bool = False) -> list[int]:
    """Exactly uniform integers ``u_k`` in ``[0, moduli[k])``, any size of modulus.

    Moduli up to ``2**62`` are drawn together by :func:`uniform_below` (so a list of such
    moduli consumes the generator exactly as :func:`uniform_below` does).  Each larger modulus
    ``m`` takes ``k = ceil(bits(m) / 62)`` uniform words, concatenated into ``U < 2**(62 k)``,
    and accepts ``U`` below the largest multiple of ``m`` (probability > 1/2), returning
    ``U mod m``; rejected entries are re-drawn, all large entries of a round in one call.
    ``secure=True`` draws from the OS CSPRNG (:func:`secrets.randbelow`)."""
    moduli = [int(m) for m in moduli]
    if any(m < 1 for m in moduli):
        raise ValueError(f"moduli must be >= 1, got {moduli}")
    if secure:
        if generator is not None:
            raise ValueError("secure=True draws from the OS CSPRNG; do not also pass a generator")
        return [secrets.randbelow(m) for m in moduli]
    big = [k for k, m in enumerate(moduli) if m > WORD]
    if not big:
        return uniform_below(moduli, generator)
    out = [0] * len(moduli)
    small = [k for k, m in enumerate(moduli) if m <= WORD]
    for k, value in zip(small, uniform_below([moduli[k] for k in small], generator)):
        out[k] = value
    todo = big
    while todo:
        words = [-(-moduli[k].bit_length() // WORD_BITS) for k in todo]
        drawn = iter(uniform_below([WORD] * sum(words), generator))
        again = []
        for k, n_words in zip(todo, words):
            value = 0
            for _ in range(n_words):
                value = (value << WORD_BITS) | next(drawn)
            span = 1 << (WORD_BITS * n_words)
            if value < span - span % moduli[k]:
                out[k] = value % moduli[k]
            else:
                again.append(k)
        todo = again
    return out


def os_seeded_generator(device=None) -> torch.Generator:
    """A ``torch.Generator`` (on ``device``) seeded with 63 bits of the OS's entropy."""
    generator = torch.Generator(device=device) if device is not None else torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return generator


def _secure_below(bounds: Sequence[int]) -> list[int]:
    return [secrets.randbelow(int(n)) for n in bounds]


def _check_moduli(origin_moduli, choice_modulus) -> tuple[tuple[int, int], int | None]:
    if origin_moduli is None:
        if choice_modulus is not None:
            raise ValueError("choice_modulus needs origin_moduli (the transform's exact moduli)")
        return (WORD, WORD), None
    my, mx = (int(m) for m in origin_moduli)
    if choice_modulus is None:  # a fixed crop: CropTokens, whose draws must stay < 2**62
        if not (1 <= my <= WORD and 1 <= mx <= WORD):
            raise ValueError(f"origin_moduli of a crop must lie in [1, 2**{WORD_BITS}], got "
                             f"{origin_moduli!r}")
        return (my, mx), None
    mg = int(choice_modulus)
    if min(mg, my, mx) < 1:
        raise ValueError(f"moduli must be >= 1, got {(mg, my, mx)}")
    return (my, mx), mg


class FixedSizeBatchSampler(BatchSampler):
    """Every step: ``B`` distinct indices, uniformly without replacement, independent of all
    other steps; each yielded as a :class:`CropToken`.

    Args:
        num_samples: ``N``, the dataset size.
        batch_size: ``B`` (``1 <= B <= N``).
        steps_per_epoch: length of an "epoch"; default ``round(N / B)`` (halves up, >= 1).
            Only bookkeeping: steps are independent, there is no epoch partition.
        generator: ``torch.Generator`` to draw from (default: a new one seeded from the OS's
            entropy, see the module docstring).
        secure: draw indices and crop origins from the OS CSPRNG (:mod:`secrets`) instead of
            ``generator`` (not reproducible).
        origin_moduli: ``(M_y, M_x)``, ranges of ``u_y``, ``u_x``; default ``2**62`` each (see
            the module docstring for the bias bound).  The loader passes exact moduli.
        choice_modulus: ``None`` (a fixed crop: :class:`CropToken` s, moduli at most
            ``2**62``) or ``M_g`` of a loader-owned transform: then every item is a
            :class:`TransformToken` and the moduli may be any size.
        noise_seeds: attach a ``noise_seed`` to every token (Gaussian augmentation), drawn
            from ``noise_generator`` (default: a new one seeded from the OS's entropy) or, with
            ``secure``, from the OS CSPRNG.

    Subclasses ``BatchSampler`` (``drop_last`` is always False) so that Opacus recognises it:
    ``BatchMemoryManager`` reads :attr:`batch_size` for its length estimate and
    ``switch_generator`` sets ``batch_sampler.sampler.generator`` (:attr:`sampler` is this
    object itself, so that replaces :attr:`generator`).
    """

    def __init__(self, num_samples: int, batch_size: int, steps_per_epoch: int | None = None,
                 generator: torch.Generator | None = None, secure: bool = False, *,
                 origin_moduli: tuple[int, int] | None = None,
                 choice_modulus: int | None = None, noise_seeds: bool = False,
                 noise_generator: torch.Generator | None = None):
        num_samples, batch_size = int(num_samples), int(batch_size)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 1 <= batch_size <= num_samples:
            raise ValueError(f"batch_size must be in [1, num_samples={num_samples}] (sampling is "
                             f"without replacement), got {batch_size}")
        if steps_per_epoch is None:
            steps_per_epoch = steps_per_epoch_for(num_samples, batch_size)
        if int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if secure and generator is not None:
            raise ValueError("secure=True draws from the OS CSPRNG (secrets); do not also pass a "
                             "generator")
        self.num_samples = num_samples
        self.global_batch_size = batch_size
        self.batch_size = batch_size
        self.steps_per_epoch = int(steps_per_epoch)
        self.drop_last = False
        self.secure = bool(secure)
        self.origin_moduli, self.choice_modulus = _check_moduli(origin_moduli, choice_modulus)
        self.seeded_by_user = generator is not None
        if generator is None and not self.secure:
            generator = os_seeded_generator()
        self.generator = generator
        if noise_generator is not None and (self.secure or not noise_seeds):
            raise ValueError("noise_generator= needs noise_seeds=True and secure=False")
        self.noise_seeds = bool(noise_seeds)
        self.noise_seeded_by_user = noise_generator is not None
        if self.noise_seeds and noise_generator is None and not self.secure:
            noise_generator = os_seeded_generator()
        self.noise_generator = noise_generator
        self.last_batch_id = -1
        self.on_iteration_start: list = []

    @property
    def sampler(self):
        """This object (Opacus' ``switch_generator`` sets ``batch_sampler.sampler.generator``)."""
        return self

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _below(self, bounds: Sequence[int]) -> list[int]:
        return _secure_below(bounds) if self.secure else draw_uniforms(bounds, self.generator)

    def draw_global_batch(self) -> list[CropToken] | list[TransformToken]:
        """One step's global batch: ``B`` distinct uniform indices (ordered uniformly at
        random) and their draws (crop origins, or a transform's choice and origin).
        Advances the generator."""
        n, b = self.num_samples, self.global_batch_size
        my, mx = self.origin_moduli
        mg = self.choice_modulus
        r = self._below([n - i for i in range(b)] + ([] if mg is None else [mg] * b)
                        + [my] * b + [mx] * b)
        # Partial Fisher-Yates on a virtual array a = [0, ..., N-1]: swap a[i] with a[i + r_i].
        moved: dict[int, int] = {}
        indices = []
        for i in range(b):
            j = i + r[i]
            a_i, a_j = moved.get(i, i), moved.get(j, j)
            moved[j] = a_i
            indices.append(a_j)
        if mg is None:
            return [CropToken(idx, uy, ux) for idx, uy, ux in zip(indices, r[b:2 * b], r[2 * b:])]
        return [TransformToken(idx, ug, uy, ux) for idx, ug, uy, ux
                in zip(indices, r[b:2 * b], r[2 * b:3 * b], r[3 * b:])]

    def _local(self, tokens: list) -> list:
        return tokens

    def _with_noise_seeds(self, tokens: list) -> list:
        """Attach fresh noise seeds (uniform in ``[0, 2**62)``) to this process's tokens."""
        words = [WORD] * len(tokens)
        seeds = _secure_below(words) if self.secure else uniform_below(words,
                                                                      self.noise_generator)
        return [with_noise_seed(t, s) for t, s in zip(tokens, seeds)]

    def __iter__(self) -> Iterator[list]:
        for callback in list(self.on_iteration_start):
            callback()
        for _ in range(self.steps_per_epoch):
            batch = self._local(self.draw_global_batch())
            if self.noise_seeds:
                batch = self._with_noise_seeds(batch)
            self.last_batch_id += 1
            yield batch


class DistributedFixedSizeBatchSampler(FixedSizeBatchSampler):
    """Distributed version: every rank draws the same global batch of ``B`` tokens from a
    generator seeded with the shared ``seed`` and keeps its slice
    ``[rank * B / R, (rank + 1) * B / R)``.  The union of the ranks' slices is exactly the
    batch a single-process :class:`FixedSizeBatchSampler` with a generator seeded by ``seed``
    yields.

    ``batch_size`` is the *per-rank* slice ``B / R`` (what one rank's loader yields);
    ``global_batch_size`` is ``B``; ``len()`` is the number of global steps per epoch.
    ``secure=True`` is refused: independent OS draws cannot agree across ranks.  Noise seeds
    (``noise_seeds=True``) are drawn by each rank for its own slice, from its own
    ``noise_generator`` (default: seeded from the OS's entropy).
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int,
                 seed: int, steps_per_epoch: int | None = None, *,
                 origin_moduli: tuple[int, int] | None = None,
                 choice_modulus: int | None = None, secure: bool = False,
                 noise_seeds: bool = False, noise_generator: torch.Generator | None = None):
        if secure:
            raise ValueError("secure=True is not supported with distributed sampling: the ranks "
                             "must draw the same global batch, which needs a shared seed")
        num_replicas, rank = int(num_replicas), int(rank)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                             f"num_replicas={num_replicas}, rank={rank}")
        if int(batch_size) % num_replicas:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size "
                             f"{num_replicas}: every rank must get the same share of the global "
                             f"batch; choose a batch size that is a multiple of {num_replicas}")
        if seed is None:
            raise ValueError("distributed sampling needs a seed shared by all ranks")
        generator = torch.Generator()
        generator.manual_seed(int(seed))
        super().__init__(num_samples, batch_size, steps_per_epoch, generator,
                         origin_moduli=origin_moduli, choice_modulus=choice_modulus,
                         noise_seeds=noise_seeds, noise_generator=noise_generator)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.batch_size = self.global_batch_size // num_replicas

    def _local(self, tokens: list) -> list:
        start = self.rank * self.batch_size
        return tokens[start:start + self.batch_size]
