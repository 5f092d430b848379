"""Winograd-ReLU convolution F(2x2, 3x3) with its weights living in the Winograd domain.

What this gives the project: a drop-in replacement for every 3x3 / stride-1 / padding-1 convolution
whose input is an activation (a :class:`esdbs_ray.models.ReLUConv2d`), computing the paper's eq. 2

    Y = A^T [ Prune(U) ⊙ ReLU(B^T d B) ] A,        summed over input channels,

so that pruning acts on the 16 Winograd-domain weights that are actually multiplied, and the
sparsity survives into the arithmetic (spec section 2).

The layer, :class:`WinogradReLUConv2d`, stores its weight in the Winograd domain and calls
:func:`~esdbs_ray.winograd_dispatch.winograd_relu_conv`; :func:`to_winograd_relu` converts a model.
The maths and the autograd Functions are in :mod:`esdbs_ray.winograd_math`, the choice of
implementation (native C++ kernels on CPU, compiled, Triton, reference) in
:mod:`esdbs_ray.winograd_dispatch`; their public names are re-exported here.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .models import ReLUConv2d
from .winograd_dispatch import (IMPL_ENV, IMPLS, _check_impl, check_impl_runs, choose_impl, default_impl,
                                fused_compile_log, resolved_impls, run_layer, tune_cpu_allocator, winograd_relu_conv)
from .winograd_math import (AT, BT, G, _input_transform, _output_transform, _pad_nhwc, _tiles,
                            spatial_to_winograd)

__all__ = [
    "BT", "G", "AT",
    "WinogradReLUConv2d",
    "winograd_relu_conv",
    "IMPLS",
    "IMPL_ENV",
    "choose_impl",
    "check_impl_runs",
    "default_impl",
    "fused_compile_log",
    "resolved_impls",
    "SparseWinogradInference",
    "to_winograd_relu",
    "winograd_layers",
    "is_winograd_eligible",
    "spatial_to_winograd",
    "tune_cpu_allocator",
]


class WinogradReLUConv2d(nn.Module):
    """3x3 / stride 1 / padding 1 convolution computed as Y = A^T [U ⊙ ReLU(B^T d B)] A (eq. 2).

    ``weight`` is the Winograd-domain tensor U of shape (16, C_in, C_out) (tile position first);
    ``kernels_4x4()`` gives the (C_out, C_in, 4, 4) copy used in figures.  With ``relu=False`` this is
    an exact re-parametrisation of a spatial 3x3 conv (when U = G g G^T).  ``impl`` picks the
    implementation (None: ``$ESDBS_WINOGRAD_IMPL`` or "auto"; see :func:`choose_impl`); it is not part
    of the state dict.
    """

    kernel_size = (3, 3)
    stride = (1, 1)
    padding = (1, 1)

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True, bias: bool = False,
                 device=None, dtype=None, impl: str | None = None):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be > 0, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels, self.relu = in_channels, out_channels, relu
        self.ran: dict[str, str] = {}  # "training" / "inference" -> the path the layer's last call took
        # relu(conv + bias): a spatial ReLU that followed the layer, moved in by inference.prepare_for_inference
        # (the native kernels then write it with the bias in their output transform); not in the state dict
        self.out_relu = False
        self.impl = None if impl is None else _check_impl(impl)
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(16, in_channels, out_channels, **fk))
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as the spatial models (kaiming fan_out on the 3x3 kernel), then mapped through G.
        g = torch.empty(self.out_channels, self.in_channels, 3, 3, device=self.weight.device,
                        dtype=self.weight.dtype)
        nn.init.kaiming_normal_(g, mode="fan_out", nonlinearity="relu")
        with torch.no_grad():
            self.weight.copy_(spatial_to_winograd(g))
            if self.bias is not None:
                self.bias.zero_()

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, relu: bool = True, impl: str | None = None) -> "WinogradReLUConv2d":
        """Initialise U = G g G^T from a 3x3 / stride-1 / padding-1 ``nn.Conv2d`` (bias copied)."""
        why = _ineligible_reason(conv)
        if why:
            raise ValueError(f"conv: {why}")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, relu=relu, bias=conv.bias is not None,
                    device=w.device, dtype=w.dtype, impl=impl)
        with torch.no_grad():
            layer.weight.copy_(spatial_to_winograd(w.detach()))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        layer.train(conv.training)
        return layer

    def kernels_4x4(self) -> torch.Tensor:
        """(C_out, C_in, 4, 4) copy of the Winograd-domain kernels (detached)."""
        return self.weight.detach().permute(2, 1, 0).reshape(self.out_channels, self.in_channels, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, path = run_layer(x, self.weight, self.bias, self.relu, self.impl, getattr(self, "weight_mask", None),
                            getattr(self, "out_relu", False))
        if not torch.compiler.is_compiling():  # which path the last training step and evaluation took
            self.ran["training" if torch.is_grad_enabled() and self.training else "inference"] = path
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), padding=(1, 1), "
                f"relu={self.relu}, bias={self.bias is not None}, domain=winograd F(2x2,3x3)"
                + (", out_relu=True" if getattr(self, "out_relu", False) else "")
                + (f", impl={self.impl}" if self.impl else ""))


# --------------------------------------------------------------------------------------------------
# sparse inference
# --------------------------------------------------------------------------------------------------
class SparseWinogradInference:
    """Inference-only evaluation of a pruned Winograd-ReLU layer that skips the pruned weights.

    ``mode="native"`` (default): the native sparse kernels (:func:`esdbs_ray.winograd_sparse.sparse_forward`,
    the 16 products on the mask's nonzeros, bias in the output transform) -- what the layer itself runs
    in ``esdbs predict`` where the mask is sparse enough; CPU, float32 / float64.
    ``mode="csr"``: a reference only, slow: per tile position p the nonzero entries of U[p]^T in a
    torch CSR matrix multiplied by the transformed input V[p]; torch's CSR product runs far below
    dense GEMM throughput on CPU (bench/winograd.py).
    ``mode="dense"``: the packed dense bmm of the training path (reference).
    """

    def __init__(self, layer: WinogradReLUConv2d, mode: str = "native"):
        if mode not in ("native", "csr", "dense"):
            raise ValueError(f"mode must be 'native', 'csr' or 'dense', got {mode!r}")
        self.mode, self.relu = mode, layer.relu
        u = layer.weight.detach()
        if hasattr(layer, "weight_mask"):
            u = u * layer.weight_mask.to(u.dtype)
        self.u = u.contiguous()
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.out_relu = getattr(layer, "out_relu", False)  # a following ReLU moved into the layer
        self.c, self.k = u.shape[1:]
        self.nnz = int((u != 0).sum())
        self.density = self.nnz / u.numel()
        if mode == "native":
            from . import winograd_native, winograd_sparse

            if not winograd_native.supports(self.u, self.u):
                raise ValueError(f"mode 'native' runs float32 / float64 on CPU; the layer is {u.dtype} on {u.device}")
            # the structure of the weights' nonzeros (a pruned layer's mask, multiplied in above)
            self.structure = winograd_sparse.SparseStructure.from_mask(self.u)
        if mode == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, not actionable
                warnings.simplefilter("ignore", UserWarning)
                self.w = [u[p].t().contiguous().to_sparse_csr() if bool((u[p] != 0).any()) else None
                          for p in range(16)]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "native":
            from .winograd_sparse import sparse_forward

            return sparse_forward(x.to(self.u.dtype), self.u, self.structure, self.relu, self.bias, self.out_relu)
        n, _, h, w = x.shape
        th, tw = _tiles(h, w)
        xp = _pad_nhwc(x, th, tw)
        if self.mode == "dense":
            y = _output_transform(torch.bmm(_input_transform(xp, th, tw, self.relu), self.u), n, th, tw)
        else:
            # torch's CSR x dense product wants a row-major dense operand: one transposing copy
            # (measured cheaper than writing the transform's strided output transposed).
            Vt = _input_transform(xp, th, tw, self.relu).transpose(1, 2).contiguous()  # (16, C, T)
            Mt = Vt.new_empty((16, self.k, Vt.shape[2]))
            for p, wp in enumerate(self.w):
                if wp is None:
                    Mt[p].zero_()
                else:
                    torch.mm(wp, Vt[p], out=Mt[p])
            y = _output_transform(Mt, n, th, tw, transposed=True)
        y = y[:, :h, :w].permute(0, 3, 1, 2)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.relu_() if self.out_relu else y


# --------------------------------------------------------------------------------------------------
# model conversion
# --------------------------------------------------------------------------------------------------
def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _ineligible_reason(conv: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"expected an nn.Conv2d, got {type(conv).__name__}"
    if _pair(conv.kernel_size) != (3, 3):
        return f"kernel_size must be 3x3, got {conv.kernel_size}"
    if _pair(conv.stride) != (1, 1):
        return f"stride must be 1, got {conv.stride}"
    if conv.padding not in ("same",) and _pair(conv.padding) != (1, 1):
        return f"padding must be 1, got {conv.padding}"
    if _pair(conv.dilation) != (1, 1):
        return f"dilation must be 1, got {conv.dilation}"
    if conv.groups != 1:
        return f"groups must be 1, got {conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode must be 'zeros', got {conv.padding_mode!r}"
    return None


def is_winograd_eligible(module: nn.Module) -> bool:
    """True for a ReLUConv2d that is 3x3, stride 1, padding 1, dilation 1, groups 1, zero padding."""
    return isinstance(module, ReLUConv2d) and _ineligible_reason(module) is None


def to_winograd_relu(model: nn.Module, impl: str | None = None) -> nn.Module:
    """Replace, in place, every eligible ReLUConv2d by a WinogradReLUConv2d(relu=True, impl=impl);
    returns model.

    The ReLUConv2d's own input ReLU is exactly the spatial ReLU that moves into the Winograd domain
    (see models.py).  Strided / 1x1 ReLUConv2d and plain nn.Conv2d (the image stem) stay spatial.
    """
    targets = [(name, m) for name, m in model.named_modules() if is_winograd_eligible(m)]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, WinogradReLUConv2d.from_conv2d(conv, relu=True, impl=impl))
    return model


def winograd_layers(model: nn.Module) -> list[tuple[str, WinogradReLUConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WinogradReLUConv2d)]
