"""Per-layer rules of the book-keeping (bk) clipping mode: per-sample norms and clipped sums.

Notation (one layer, one forward use). ``B`` samples; ``A`` the layer input, ``G`` the
gradient of the (reduced) loss with respect to the layer output, as autograd delivers it to a
tensor hook. For a linear map applied at ``T`` positions (``T`` = output pixels of a
convolution, tokens of a Linear on ``(B, *, d)``, 1 for a Linear on ``(B, d)``), group ``k`` of
``g`` groups, sample ``i``::

    U_i^k  (d_in  x T)  input patches   (conv: unfold of A_i, d_in = C_in/g * k_h * k_w)
    G_i^k  (d_out x T)  output gradient (d_out = C_out/g)
    W-gradient of sample i:   g_i^k = G_i^k (U_i^k)^T                      (d_out x d_in)
    bias gradient:            b_i   = sum_t G_i[:, t]                      (C_out)

Per-sample squared norm of the weight gradient, two exact ways:

* **instantiate**: form ``g_i`` (costs ``g*T*d_in*d_out`` MACs per sample, the same as the
  ordinary weight gradient) and reduce it to ``||g_i||_F^2`` at once;
* **ghost** (Goodfellow 2015; Li et al. 2022; Bu et al. 2023):
  ``||g_i||_F^2 = sum_k <U_i^k^T U_i^k, G_i^k^T G_i^k>_F`` (two ``T x T`` Gram matrices, costs
  ``g*T^2*(d_in+d_out)`` MACs and ``g*T^2`` memory per sample); for ``T = 1`` this is
  ``||u_i||^2 ||G_i||^2``.

The clipped sum with per-sample weights ``w_i`` (``w_i = c_i * s``, clip factor times the
loss-reduction scale, see :mod:`patchdp_opacus.fast.module`) is
``sum_i w_i g_i``, formed either from **kept** per-sample gradients (``B*|W|`` memory until the
optimizer step, ``B*|W|`` MACs at the step) or by **recompute**: one ordinary weight gradient
with the output gradient rescaled per sample, ``conv2d_weight(A, W.shape, w*G)`` /
``(w*G)^T A`` (keeps ``A`` and ``G`` until the step, ``T*|W|`` MACs per sample at the step).

Cost model (:func:`plan_weight`, per sample, per forward use)::

    ghost_macs       = g * T^2 * (d_in + d_out)
    instantiate_macs = g * T * d_in * d_out                    (= T * |W|)
    option                   MACs in hook + at step      kept until the step
    instantiate + keep       T*|W|        + |W|          |W|
    ghost + recompute        ghost_macs   + T*|W|        |A_i| + |G_i|
    instantiate + recompute  T*|W|        + T*|W|        |A_i| + |G_i|

    storage = keep       if |W| <= |A_i| + |G_i|   (least memory, and always the fewest MACs
              recompute  otherwise                   unless T^2*(d_in+d_out) < d_in*d_out)
    norm    = instantiate                           if storage == keep
              ghost if ghost_macs < instantiate_macs otherwise

Keeping costs ``|W|`` MACs at the step instead of a second weight gradient, so it is chosen
whenever it also saves memory; recompute is chosen for layers whose weight is larger than the
activation and output gradient of one sample (small ``T``), where ghost norms are cheap.

At segmentation resolutions (T = 64^2 .. 128^2 for a 505 crop at output stride 8) every
convolution of a ResNet-101 DeepLabV3+/PSPNet has ``|W| <= |A_i| + |G_i|``: its per-sample
gradients are kept (memory close to non-private training, and the step costs ``B*|W|``).
Ghost norms with recompute serve the small-``T`` layers: image-pooling branches (``T = 1``),
PSP pyramid bins (``T = 1, 4, 9, 36``), Linear heads.

Normalisation layers (GroupNorm, LayerNorm) and all biases have per-sample gradients of size
``B x C`` or ``B x |gamma|``; they are always instantiated and kept.

Everything here works on tensors and module attributes only (no hooks, no state kept);
:func:`_conv_precision` sets torch's global matmul TF32 flag for the duration of a call.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "LayerPlan",
    "UnsupportedLayerError",
    "BKOptions",
    "plan_weight",
    "rule_for",
    "SUPPORTED_LAYERS",
]

NORM_METHODS = ("auto", "ghost", "instantiate")
STORAGES = ("auto", "keep", "recompute")
CONV_BACKENDS = ("auto", "grouped", "unfold", "loop")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class UnsupportedLayerError(TypeError):
    """A trainable layer has no per-sample rule in bk mode (the message names the module)."""


@dataclass(frozen=True)
class BKOptions:
    """Knobs of the bk mode (defaults follow the cost model; the others exist to measure it).

    Attributes:
        norm_method: "auto" (cost model), "ghost" or "instantiate" for Conv2d/Linear weights.
        storage: "auto" (cost model), "keep" (per-sample weight gradients kept until the step)
            or "recompute" (activation and output gradient kept; clipped sum = one weighted
            ordinary weight gradient, the book-keeping formulation of Bu et al. 2023).
        conv_backend: how a convolution's per-sample weight gradients are instantiated:
            "grouped" (one cuDNN/aten weight-gradient convolution with ``groups = B*g``: the
            batch is folded into channels), "unfold" (im2col + batched matmul under the conv
            TF32 policy), "loop" (the ordinary weight-gradient kernel once per sample),
            "auto" = grouped on CUDA (the same kernels and TF32 policy as the ordinary conv
            backward), unfold on CPU.
        skip_weight_grad: do not let autograd compute the ordinary ``.grad`` of hooked
            parameters (DP discards it). Implemented by clearing ``requires_grad`` of the
            layer's parameters for the duration of its forward call, so the autograd node
            records ``output_mask = (input, False, False)``.
        chunk_bytes: budget for transient tensors of one per-sample computation; samples are
            processed in chunks that fit it (the result of "keep" is not counted).
    """

    norm_method: str = "auto"
    storage: str = "auto"
    conv_backend: str = "auto"
    skip_weight_grad: bool = True
    chunk_bytes: int = 2**30

    def __post_init__(self):
        if self.norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method must be one of {NORM_METHODS}, got {self.norm_method!r}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.conv_backend not in CONV_BACKENDS:
            raise ValueError(f"conv_backend must be one of {CONV_BACKENDS}, got {self.conv_backend!r}")
        if self.norm_method == "ghost" and self.storage == "keep":
            raise ValueError("norm_method='ghost' never forms per-sample gradients, so they cannot "
                             "be kept: use storage='recompute' or 'auto'")
        if int(self.chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be positive, got {self.chunk_bytes}")


@dataclass(frozen=True)
class LayerPlan:
    """What the cost model chose for one forward use of a layer (per-sample quantities).

    Attributes:
        norm: "ghost", "instantiate" (weights) or "direct" (normalisation layers, bias only).
        storage: "keep" or "recompute".
        positions: T, output positions per sample.
        d_in, d_out, groups: the per-group GEMM shape of the weight gradient.
        ghost_macs, instantiate_macs: the two norm costs of the model (per sample).
        weight_numel: |W|; io_numel: |A_i| + |G_i| (per sample).
    """

    norm: str
    storage: str
    positions: int = 1
    d_in: int = 0
    d_out: int = 0
    groups: int = 1
    ghost_macs: int = 0
    instantiate_macs: int = 0
    weight_numel: int = 0
    io_numel: int = 0


def plan_weight(positions: int, d_in: int, d_out: int, groups: int, io_numel: int,
                options: BKOptions) -> LayerPlan:
    """Apply the cost model of the module docstring to one weight (Conv2d or Linear).

    Args:
        positions: T; d_in, d_out: per-group GEMM sizes; groups: g;
        io_numel: ``|A_i| + |G_i|``, elements of one sample's input and output gradient.
    """
    ghost = groups * positions * positions * (d_in + d_out)
    inst = groups * positions * d_in * d_out
    weight_numel = groups * d_in * d_out
    if options.storage != "auto":
        storage = options.storage
    elif options.norm_method == "ghost":
        storage = "recompute"
    else:
        storage = "keep" if weight_numel <= io_numel else "recompute"
    if storage == "keep":
        norm = "instantiate"
    elif options.norm_method != "auto":
        norm = options.norm_method
    else:
        norm = "ghost" if ghost < inst else "instantiate"
    return LayerPlan(norm=norm, storage=storage, positions=positions, d_in=d_in, d_out=d_out,
                     groups=groups, ghost_macs=ghost, instantiate_macs=inst,
                     weight_numel=weight_numel, io_numel=io_numel)


# -- helpers ---------------------------------------------------------------------------------

def _acc_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """Accumulation dtype for reductions: fp32 for half types, the tensor's own otherwise."""
    return torch.float32 if t.dtype in _LOW_PRECISION else None


def _norm_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype of norm accumulators: fp32, or the input's if wider (fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _sq_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """(n, *) -> (n,) squared Frobenius norms of each slice (fp32, fp64 for fp64 input)."""
    n = per_sample.shape[0]
    flat = per_sample.reshape(n, -1)
    return torch.linalg.vector_norm(flat, ord=2, dim=1, dtype=_norm_dtype(flat)).square()


def _chunks(batch: int, per_sample_bytes: int, budget: int):
    """Yield (start, stop) slices of the batch whose transient memory fits ``budget`` bytes."""
    step = max(1, min(batch, budget // max(1, per_sample_bytes)))
    for start in range(0, batch, step):
        yield start, min(batch, start + step)


def _weighted_sum(weights: torch.Tensor, per_sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_i w_i * per_sample[i]`` in ``dtype`` (the parameter's), as Opacus' clip step does."""
    ps = per_sample.to(dtype)
    return torch.einsum("i,i...", weights.to(device=ps.device, dtype=dtype), ps)


# -- Conv2d ----------------------------------------------------------------------------------

def _conv_geometry(module: nn.Conv2d, act: torch.Tensor):
    """Return ``(input, padding)`` such that ``conv2d(input, W, padding=padding)`` with the
    module's stride/dilation/groups reproduces the module's forward (explicit padding for
    ``padding_mode != 'zeros'`` and for asymmetric ``padding='same'``)."""
    if module.padding_mode != "zeros":
        return F.pad(act, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    if isinstance(module.padding, str):
        left_w, right_w, top, bottom = module._reversed_padding_repeated_twice
        if left_w == right_w and top == bottom:
            return act, (top, left_w)
        return F.pad(act, module._reversed_padding_repeated_twice), (0, 0)
    return act, tuple(module.padding)


def _conv_patches(module: nn.Conv2d, act: torch.Tensor, padding, out_hw) -> torch.Tensor:
    """Input patches ``U`` of shape (n, C_in*k_h*k_w, T) (im2col), without a copy for a 1x1
    stride-1 unpadded convolution."""
    n, c_in = act.shape[:2]
    kh, kw = module.kernel_size
    if (kh, kw) == (1, 1) and tuple(padding) == (0, 0):
        sh, sw = module.stride
        x = act if (sh, sw) == (1, 1) else act[:, :, ::sh, ::sw]
        x = x[:, :, : out_hw[0], : out_hw[1]]
        return x.reshape(n, c_in, -1)
    return F.unfold(act, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)


@contextlib.contextmanager
def _conv_precision(t: torch.Tensor):
    """Run matmuls that stand in for a convolution under the convolution's fp32 policy.

    PyTorch's defaults let cuDNN convolutions use TF32 (``torch.backends.cudnn.allow_tf32``)
    but not matmuls (``torch.backends.cuda.matmul.allow_tf32``); the im2col/ghost paths of a
    conv layer follow the conv flag so they are as precise (and as fast) as the ordinary conv
    backward they replace. The global matmul flag is set for the duration and restored."""
    if not t.is_cuda or t.dtype != torch.float32:
        yield
        return
    want, prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if want == prev:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = want
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _grouped_patches(module, act, grad, padding):
    """Per group: input patches ``U`` (n, g, C_in/g * k_h * k_w, T) and output gradients
    ``G`` (n, g, C_out/g, T) of a convolution, T = output positions."""
    n, c_out = grad.shape[:2]
    g = module.groups
    u = _conv_patches(module, act, padding, grad.shape[2:])
    return u.reshape(n, g, u.shape[1] // g, u.shape[2]), grad.reshape(n, g, c_out // g, -1)


def _conv_ps_unfold(module, act, grad, padding) -> torch.Tensor:
    """Per-sample weight gradients (n, C_out, C_in/g, k_h, k_w) via im2col + batched matmul:
    ``g_i^k = G_i^k (U_i^k)^T``."""
    u, go = _grouped_patches(module, act, grad, padding)
    with _conv_precision(go):
        ps = torch.matmul(go, u.transpose(-1, -2))
    return ps.reshape(act.shape[0], *module.weight.shape)


def _conv_ps_grouped(module, act, grad, padding) -> torch.Tensor:
    """Per-sample weight gradients via one weight-gradient convolution with the batch folded
    into the channels: input (1, n*C_in, H, W), output gradient (1, n*C_out, H_o, W_o),
    ``groups = n*g``; group ``i*g + k`` is sample i's group k."""
    n, c_in, h, w = act.shape
    c_out = grad.shape[1]
    wshape = module.weight.shape
    x = act.reshape(1, n * c_in, h, w)
    go = grad.reshape(1, n * c_out, *grad.shape[2:])
    ps = torch.nn.grad.conv2d_weight(x, (n * c_out, *wshape[1:]), go, module.stride, padding,
                                     module.dilation, module.groups * n)
    return ps.reshape(n, *wshape)


def _conv_ps_loop(module, act, grad, padding) -> torch.Tensor:
    """Per-sample weight gradients with the ordinary weight-gradient kernel, one sample at a
    time (``n`` launches; each has the full ``C_out x C_in*k*k x T`` GEMM shape)."""
    wshape = module.weight.shape
    out = grad.new_empty((act.shape[0], *wshape))
    for i in range(act.shape[0]):
        out[i] = torch.nn.grad.conv2d_weight(act[i:i + 1], wshape, grad[i:i + 1], module.stride,
                                             padding, module.dilation, module.groups)
    return out


def _conv_ghost_sq(module, act, grad, padding) -> torch.Tensor:
    """(n,) fp32 ``sum_k <U^k^T U^k, G^k^T G^k>`` (ghost norm of the weight gradient)."""
    u, go = _grouped_patches(module, act, grad, padding)
    with _conv_precision(go):
        return _ghost_from_mats(u, go)


def _ghost_from_mats(u: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """u: (n, g, d_in, T), go: (n, g, d_out, T) -> (n,) fp32 ghost squared norms."""
    n = u.shape[0]
    dtype = _norm_dtype(u)
    if u.shape[-1] == 1:
        su = torch.linalg.vector_norm(u, dim=(2, 3), dtype=dtype).square()
        sg = torch.linalg.vector_norm(go, dim=(2, 3), dtype=dtype).square()
        return (su * sg).sum(1)
    gram_u = torch.matmul(u.transpose(-1, -2), u)
    gram_g = torch.matmul(go.transpose(-1, -2), go)
    return (gram_u * gram_g).reshape(n, -1).sum(1, dtype=dtype)


class _WeightRule:
    """Shared logic of Conv2d and Linear: weight by the plan, bias always kept."""

    kind = "weight"

    # subclass API ---------------------------------------------------------------------------
    def shapes(self, module, act, grad):  # -> positions, d_in, d_out, groups
        raise NotImplementedError

    def prepare(self, module, act, grad):  # -> (act', grad', extra) normalised views
        raise NotImplementedError

    def ps_weight(self, module, act, grad, extra, options) -> torch.Tensor:
        raise NotImplementedError

    def ghost_sq(self, module, act, grad, extra) -> torch.Tensor:
        raise NotImplementedError

    def ps_bias(self, grad) -> torch.Tensor:
        raise NotImplementedError

    def weighted_weight_grad(self, module, act, grad, extra, weights) -> torch.Tensor:
        raise NotImplementedError

    def transient_bytes(self, module, act, grad, plan, options) -> int:
        raise NotImplementedError

    # common ---------------------------------------------------------------------------------
    def plan(self, module, act, grad, options: BKOptions) -> LayerPlan:
        positions, d_in, d_out, groups = self.shapes(module, act, grad)
        n = max(1, grad.shape[0])
        io = (act.numel() + grad.numel()) // n
        return plan_weight(positions, d_in, d_out, groups, io, options)

    def backward(self, module, act, grad, params: dict, options: BKOptions):
        """At the backward hook: squared norms (n,) fp32, kept per-sample grads, and whether
        the activation/output gradient must be kept for :meth:`recompute`."""
        n = grad.shape[0]
        act = act.to(grad.dtype)
        plan = self.plan(module, act, grad, options)
        sq = torch.zeros(n, dtype=_norm_dtype(grad), device=grad.device)
        kept = {}
        a2, g2, extra = self.prepare(module, act, grad)
        if "bias" in params:
            kept["bias"] = self.ps_bias(g2)
            sq += _sq_norms(kept["bias"])
        need_io = False
        if "weight" in params:
            per = self.transient_bytes(module, a2, g2, plan, options)
            if plan.norm == "ghost":
                # small T by construction: Gram matrices of half inputs are formed in fp32
                up = torch.float32 if g2.dtype in _LOW_PRECISION else g2.dtype
                for s, e in _chunks(n, per, options.chunk_bytes):
                    sq[s:e] += self.ghost_sq(module, a2[s:e].to(up), g2[s:e].to(up), extra)
            elif plan.storage == "keep":
                out = None
                for s, e in _chunks(n, per, options.chunk_bytes):
                    ps = self.ps_weight(module, a2[s:e], g2[s:e], extra, options)
                    if out is None:
                        if e == n:
                            out = ps
                        else:
                            out = ps.new_empty((n, *ps.shape[1:]))
                    if out is not ps:
                        out[s:e] = ps
                    sq[s:e] += _sq_norms(ps)
                kept["weight"] = out
            else:
                for s, e in _chunks(n, per, options.chunk_bytes):
                    sq[s:e] += _sq_norms(self.ps_weight(module, a2[s:e], g2[s:e], extra, options))
            need_io = plan.storage == "recompute"
        return plan, sq, kept, need_io

    def per_sample(self, module, act, grad, params: dict, options: BKOptions) -> dict:
        """Instantiated per-sample gradients of every trainable parameter (shared modules)."""
        act = act.to(grad.dtype)
        a2, g2, extra = self.prepare(module, act, grad)
        out = {}
        if "weight" in params:
            out["weight"] = self.ps_weight(module, a2, g2, extra, options)
        if "bias" in params:
            out["bias"] = self.ps_bias(g2)
        return out

    def recompute(self, module, act, grad, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``sum_i weights_i * g_i`` of the weight from the kept activation and output gradient.

        Half-precision inputs are computed in fp32, so the clip weights are not rounded to
        8 bits (which could push a clipped per-sample norm above C by ~0.4%)."""
        work = torch.float32 if grad.dtype in _LOW_PRECISION else grad.dtype
        act, grad = act.to(work), grad.to(work)
        a2, g2, extra = self.prepare(module, act, grad)
        return self.weighted_weight_grad(module, a2, g2, extra, weights.to(work)).to(dtype)


class ConvRule(_WeightRule):
    """``nn.Conv2d``: any stride, padding (numbers, "same", "valid", any padding_mode),
    dilation, groups; with or without bias. A: (B, C_in, H, W); G: (B, C_out, H_o, W_o)."""

    def shapes(self, module, act, grad):
        g = module.groups
        kh, kw = module.kernel_size
        positions = int(grad.shape[2] * grad.shape[3])
        return positions, (act.shape[1] // g) * kh * kw, grad.shape[1] // g, g

    def prepare(self, module, act, grad):
        act, padding = _conv_geometry(module, act)
        return act, grad, padding

    def _backend(self, act, options):
        if options.conv_backend != "auto":
            return options.conv_backend
        return "grouped" if act.is_cuda else "unfold"

    def ps_weight(self, module, act, grad, padding, options):
        backend = self._backend(act, options)
        if backend == "grouped":
            return _conv_ps_grouped(module, act, grad, padding)
        if backend == "loop":
            return _conv_ps_loop(module, act, grad, padding)
        return _conv_ps_unfold(module, act, grad, padding)

    def ghost_sq(self, module, act, grad, padding):
        return _conv_ghost_sq(module, act, grad, padding)

    def ps_bias(self, grad):
        return grad.sum(dim=(2, 3), dtype=_acc_dtype(grad))

    def weighted_weight_grad(self, module, act, grad, padding, weights):
        # sum_i w_i g_i is bilinear in (A_i, G_i): scale the smaller of the two tensors.
        shape = (-1, 1, 1, 1)
        if grad.numel() <= act.numel():
            grad = grad * weights.view(shape)
        else:
            act = act * weights.view(shape)
        return torch.nn.grad.conv2d_weight(act, module.weight.shape, grad, module.stride, padding,
                                           module.dilation, module.groups)

    def transient_bytes(self, module, act, grad, plan, options):
        n = max(1, act.shape[0])
        elt = grad.element_size()
        a, g = act.numel() // n, grad.numel() // n
        unfold = plan.groups * plan.d_in * plan.positions
        if plan.norm == "ghost":
            return elt * (unfold + 2 * plan.groups * plan.positions ** 2)
        backend = self._backend(act, options)
        if backend == "grouped":
            return elt * (plan.weight_numel + a + g)   # reshape copies (channels_last) + result
        if backend == "loop":
            return elt * plan.weight_numel
        return elt * (plan.weight_numel + unfold)


class LinearRule(_WeightRule):
    """``nn.Linear`` on (B, d_in) or (B, *, d_in) (T = product of the middle dimensions)."""

    def shapes(self, module, act, grad):
        n = max(1, grad.shape[0])
        positions = grad.numel() // (n * grad.shape[-1]) if grad.numel() else 1
        return positions, act.shape[-1], grad.shape[-1], 1

    def prepare(self, module, act, grad):
        n = act.shape[0]
        return act.reshape(n, -1, act.shape[-1]), grad.reshape(n, -1, grad.shape[-1]), None

    def ps_weight(self, module, act, grad, extra, options):
        return torch.matmul(grad.transpose(1, 2), act)

    def ghost_sq(self, module, act, grad, extra):
        return _ghost_from_mats(act.transpose(1, 2).unsqueeze(1), grad.transpose(1, 2).unsqueeze(1))

    def ps_bias(self, grad):
        return grad.sum(dim=1, dtype=_acc_dtype(grad))

    def weighted_weight_grad(self, module, act, grad, extra, weights):
        gw = grad * weights.view(-1, 1, 1)
        return gw.reshape(-1, gw.shape[-1]).t().matmul(act.reshape(-1, act.shape[-1]))

    def transient_bytes(self, module, act, grad, plan, options):
        elt = grad.element_size()
        if plan.norm == "ghost":
            return elt * 2 * plan.positions ** 2
        return elt * plan.weight_numel


class _AffineNormRule:
    """Normalisation layers ``y = xhat * gamma + beta`` with per-sample gradients
    ``dgamma_i = sum_{other dims} G_i * xhat_i`` and ``dbeta_i = sum_{other dims} G_i`` (tiny:
    always instantiated and kept)."""

    kind = "norm"

    def xhat(self, module, act):
        raise NotImplementedError

    def reduce(self, module, t):  # (n, ...) -> (n, *param.shape), accumulated in fp32 if half
        raise NotImplementedError

    def per_sample(self, module, act, grad, params: dict, options: BKOptions) -> dict:
        n = grad.shape[0]
        out = {}
        if "bias" in params:
            out["bias"] = self.reduce(module, grad)
        if "weight" in params:
            per = (act.numel() + 2 * grad.numel()) // max(1, n) * grad.element_size()
            chunks = []
            for s, e in _chunks(n, per, options.chunk_bytes):
                xh = self.xhat(module, act[s:e].to(grad.dtype))
                chunks.append(self.reduce(module, grad[s:e] * xh))
            out["weight"] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return out

    def backward(self, module, act, grad, params: dict, options: BKOptions):
        kept = self.per_sample(module, act, grad, params, options)
        sq = torch.zeros(grad.shape[0], dtype=_norm_dtype(grad), device=grad.device)
        for t in kept.values():
            sq += _sq_norms(t)
        return LayerPlan(norm="direct", storage="keep"), sq, kept, False

    def recompute(self, *args, **kwargs):  # never needed: storage is always "keep"
        raise AssertionError("normalisation layers keep their per-sample gradients")


class GroupNormRule(_AffineNormRule):
    """``nn.GroupNorm(G, C, affine=True)`` on (B, C, *).

    fp32/fp64: no normalised copy of the input is formed. With ``L`` positions, per sample and
    channel ``c`` of group ``k``: ``mu, var`` the group statistics (biased), ``r = (var +
    eps)^(-1/2)``, ``ds_c = sum_l G_cl x_cl``, ``db_c = sum_l G_cl``; then
    ``dgamma_c = r * (ds_c - mu * db_c)`` and ``dbeta_c = db_c`` (four reads of the activation
    and gradient, no write). Half precision falls back to the ``xhat`` formulation (the
    difference would cancel badly)."""

    def per_sample(self, module, act, grad, params: dict, options: BKOptions) -> dict:
        if grad.dtype in _LOW_PRECISION or "weight" not in params or act.dim() < 2:
            return super().per_sample(module, act, grad, params, options)
        act = act.to(grad.dtype)
        n, c = grad.shape[:2]
        groups = module.num_groups
        if act.dim() == 4 and act.is_contiguous(memory_format=torch.channels_last) \
                and grad.is_contiguous(memory_format=torch.channels_last):
            x = act.permute(0, 2, 3, 1).reshape(n, -1, c)   # (n, L, C) views, no copy
            go = grad.permute(0, 2, 3, 1).reshape(n, -1, c)
            var, mu = torch.var_mean(x.reshape(n, x.shape[1], groups, c // groups), dim=(1, 3),
                                     correction=0)
            ds = torch.einsum("nlc,nlc->nc", go, x)
            db = go.sum(1)
        else:
            x = act.reshape(n, c, -1)
            go = grad.reshape(n, c, -1)
            var, mu = torch.var_mean(x.reshape(n, groups, -1), dim=-1, correction=0)
            ds = torch.einsum("ncl,ncl->nc", go, x)
            db = go.sum(-1)
        rstd = (var + module.eps).rsqrt().repeat_interleave(c // groups, dim=1)
        mu = mu.repeat_interleave(c // groups, dim=1)
        out = {"weight": (ds - mu * db) * rstd}
        if "bias" in params:
            out["bias"] = db
        return out

    def xhat(self, module, act):
        return F.group_norm(act, module.num_groups, None, None, module.eps)

    def reduce(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1, dtype=_acc_dtype(t))


class LayerNormRule(_AffineNormRule):
    """``nn.LayerNorm(normalized_shape)`` on (B, *, *normalized_shape)."""

    def xhat(self, module, act):
        return F.layer_norm(act, module.normalized_shape, None, None, module.eps)

    def reduce(self, module, t):
        shape = tuple(module.normalized_shape)
        return t.reshape(t.shape[0], -1, *shape).sum(1, dtype=_acc_dtype(t))


#: Supported layer types -> rule. The type must not override ``forward`` (a subclass that
#: changes the computation, e.g. weight standardisation, would silently get wrong norms).
SUPPORTED_LAYERS: dict[type, Callable[[], object]] = {
    nn.Conv2d: ConvRule,
    nn.Linear: LinearRule,
    nn.GroupNorm: GroupNormRule,
    nn.LayerNorm: LayerNormRule,
}
_PARAM_NAMES = ("weight", "bias")


def rule_for(name: str, module: nn.Module, trainable: list[str]):
    """The rule for a module that owns the trainable parameters ``trainable``, or raise
    :class:`UnsupportedLayerError` naming the module."""
    label = f"module {name or '<root>'!r} ({type(module).__name__})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedLayerError(
            f"{label} has trainable parameters {trainable}: a BatchNorm in training mixes the "
            f"samples of a batch. Freeze it (patchdp_opacus.plugin.compat.freeze_batchnorm) or "
            f"replace it with GroupNorm")
    for cls, rule in SUPPORTED_LAYERS.items():
        if isinstance(module, cls):
            overridden = [m for m in ("forward", "_conv_forward")
                          if hasattr(cls, m) and getattr(type(module), m) is not getattr(cls, m)]
            if overridden:
                raise UnsupportedLayerError(
                    f"{label} subclasses {cls.__name__} but overrides {overridden}; bk mode only "
                    f"knows the per-sample gradient of the plain {cls.__name__} computation. "
                    f"Freeze it or use grad_sample_mode='hooks' with a registered grad sampler")
            extra = [t for t in trainable if t not in _PARAM_NAMES]
            if extra:
                raise UnsupportedLayerError(f"{label} has extra trainable parameters {extra}")
            return rule()
    supported = ", ".join(c.__name__ for c in SUPPORTED_LAYERS)
    raise UnsupportedLayerError(
        f"{label} has trainable parameters {trainable} but bk mode has no per-sample gradient "
        f"rule for {type(module).__name__} (supported: {supported}; frozen layers of any type "
        f"are fine). Freeze it with requires_grad_(False) or use grad_sample_mode='hooks'")


def describe(plan: LayerPlan) -> str:
    """One-line human-readable plan (for logs and the benchmark)."""
    if plan.norm == "direct":
        return "direct/keep"
    return (f"{plan.norm}/{plan.storage} T={plan.positions} d_in={plan.d_in} d_out={plan.d_out} "
            f"g={plan.groups} ghost={plan.ghost_macs:.3g} inst={plan.instantiate_macs:.3g} "
            f"|W|={plan.weight_numel} |A|+|G|={plan.io_numel}")

