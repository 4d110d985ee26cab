"""Building blocks of the lat-lon UNet: sphere-aware padding, convolutions, embeddings.

Every spatial operation of :class:`geodiff.unet.LatLonUNet` goes through
:class:`LatLonConv2d`, which convolves the input padded by its :class:`LatLonPad` (halos copied
explicitly, zero padding left to the convolution), so a global grid is treated as what it is:

* longitude is **periodic** (circular padding: column ``-1`` is the last column), so there is
  no seam at the date line;
* across a **pole** the neighbouring row is the same row seen from the other side of the
  globe: the row at ``lon + 180`` deg, i.e. rolled by ``W / 2`` with the row order flipped;
* regional grids use ordinary zero padding.

Tensors are ``(B, C, H, W) = (batch, channel, lat, lon)``; rows are assumed cell-centred, the
first and last rows half a grid spacing from the poles when pole padding is used.

The residual block and attention follow Ho et al. (2020, "Denoising Diffusion Probabilistic
Models", appendix B) with the scale-shift ("adaptive group norm") embedding injection of
Dhariwal & Nichol (2021, "Diffusion Models Beat GANs on Image Synthesis", sec. 3).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GridTopology:
    """How a lat-lon grid continues beyond its edges.

    Attributes
    ----------
    periodic_lon
        The grid covers all longitudes: pad circularly in longitude.
    pole_padding
        The grid spans pole to pole: pad latitude with the rows across the pole (requires
        ``periodic_lon``); otherwise latitude is zero padded.
    """

    periodic_lon: bool = False
    pole_padding: bool = False

    def __post_init__(self) -> None:
        if self.pole_padding and not self.periodic_lon:
            raise ValueError(f"pole_padding={self.pole_padding} needs periodic_lon=True: the row "
                             "across a pole is the row at lon + 180 deg, which only exists on "
                             "a grid that covers all longitudes; set pole_padding=False for a "
                             "regional grid")


class LatLonPad(nn.Module):
    """Pad ``(B, C, H, W)`` by ``pad`` rows/columns on every side, respecting the sphere.

    Longitude (last dim) is padded circularly when ``topology.periodic_lon``, latitude with
    the rows across the pole when ``topology.pole_padding``; every other side is zero padded.
    The zero part can be handed to the convolution (:attr:`implicit`), which avoids a copy:
    ``forward(x) == F.pad(explicit(x), implicit-as-F.pad-tuple)``.

    Parameters
    ----------
    pad
        Number of rows and columns added on each side (``kernel_size // 2`` for a conv).
    topology
        The grid's periodicity, see :class:`GridTopology`.
    """

    def __init__(self, pad: int, topology: GridTopology) -> None:
        super().__init__()
        if pad < 0:
            raise ValueError(f"{pad=} must be >= 0")
        self.pad = pad
        self.topology = topology

    @property
    def implicit(self) -> tuple[int, int]:
        """Zero padding ``(lat, lon)`` left to the convolution's own ``padding`` argument."""
        lat = 0 if self.topology.pole_padding else self.pad
        lon = 0 if self.topology.periodic_lon else self.pad
        return lat, lon

    def explicit(self, x: Tensor, silu: bool = False, *, fresh_grad: bool = False) -> Tensor:
        """The non-zero (circular / cross-pole) part of the padding of ``x`` ``(B, C, H, W)``.

        ``(B, C, H + 2 ph, W + 2 pad)`` with ``ph = pad`` under pole padding, else 0; ``x``
        itself on a regional grid. With ``silu``, of ``silu(x)`` (computed in the same pass).
        ``fresh_grad=True`` promises that the gradient reaching the result belongs to it
        alone (a convolution's ``grad_input``: :class:`LatLonConv2d`), so the backward may
        fold the halo into it in place; otherwise it works on a copy (autograd hands one
        gradient tensor to several consumers, e.g. of ``a + b``).
        """
        p = self.pad
        if p == 0 or not self.topology.periodic_lon:
            return F.silu(x) if silu else x
        w = x.shape[-1]
        if w < p:
            raise ValueError(f"circular padding of {p} columns needs W >= {p}, got W={w}")
        pole = self.topology.pole_padding
        if pole and x.shape[-2] < p:
            raise ValueError(f"pole padding of {p} rows needs H >= {p}, got H={x.shape[-2]}")
        if pole and w % 2:
            raise ValueError(f"pole padding needs an even number of longitudes, got W={w} (at "
                             "this resolution level); use an even W divisible by "
                             "2**len(channels)")
        if torch.compiler.is_compiling():
            # under torch.compile the plain tensor version lets Inductor fuse the halo into
            # the neighbouring kernels (it cannot trace the index caches of _SpherePad)
            return _sphere_pad_traceable(F.silu(x) if silu else x, p, pole)
        if x.requires_grad and torch.is_grad_enabled() and not _gathers(x):
            return _SpherePad.apply(x, p, pole, silu, fresh_grad)
        # no autograd node (sampling, evaluation), or small tensors padded by one gather,
        # whose backward (an index_add_) autograd runs in C++ without Python
        return _sphere_pad(x, p, pole, silu)

    def explicit_upsampled(self, x: Tensor) -> Tensor:
        """:meth:`explicit` of ``x`` ``(B, C, H, W)`` upsampled 2x by nearest neighbour.

        On periodic grids one gather of a cached index builds the padded upsampled tensor
        ``(B, C, 2 H + 2 ph, 2 W + 2 pad)`` straight from ``x``: one pass instead of
        ``F.interpolate`` (which on CPU converts to channels-last and back) followed by the
        halo copies; autograd's backward is one ``index_add_``. On 2 cores, forward 0.07-0.21x
        the time at 4 x 64-128 x 8x16-16x32, 0.85x at 16 x 128 x 32x64; forward + backward
        0.27-0.63x. Without a halo (regional grids) the gather alone replaces
        ``F.interpolate`` for CPU tensors below ``_UPSAMPLE_GATHER_BELOW`` values per sample
        (forward 0.12-0.28x, forward + backward 0.28-0.82x the time; from 128 K values on
        interpolate is as fast or faster).
        """
        periodic = self.pad > 0 and self.topology.periodic_lon
        small = x.device.type == "cpu" and x[0].numel() < _UPSAMPLE_GATHER_BELOW
        if torch.compiler.is_compiling() or not (periodic or small):
            return self.explicit(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        h, w = x.shape[-2:]
        # without a halo (regional grids) the gather is the upsampling alone
        p, pole = (self.pad, self.topology.pole_padding) if periodic else (0, False)
        ph = p if pole else 0
        return _gather_grid(x, _upsampled_source_index(h, w, p, pole, x.device),
                            2 * h + 2 * ph, 2 * w + 2 * p)

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        """``x`` (or ``silu(x)``) ``(B, C, H, W)`` padded to ``(B, C, H + 2 pad, W + 2 pad)``."""
        lat, lon = self.implicit
        return F.pad(self.explicit(x, silu), (lon, lon, lat, lat))

    def extra_repr(self) -> str:
        return (f"pad={self.pad}, periodic_lon={self.topology.periodic_lon}, "
                f"pole_padding={self.topology.pole_padding}")


@functools.lru_cache(maxsize=256)
def _source_index(h: int, w: int, p: int, pole: bool, device: torch.device) -> Tensor:
    """For every cell of the padded grid ``(H + 2 ph) x (W + 2 p)`` (``ph = p`` with pole
    padding, else 0), the flat index of the cell of the unpadded ``H x W`` grid it copies."""
    ph = p if pole else 0
    rows = torch.arange(-ph, h + ph)[:, None].expand(-1, w + 2 * p)        # (H+2ph, W+2p)
    cols = torch.arange(-p, w + p)[None, :].expand(h + 2 * ph, -1)
    across = (rows < 0) | (rows >= h)
    # a row r beyond a pole is row -1-r (south) or 2h-1-r (north) seen from lon + 180 deg
    src_row = torch.where(rows < 0, -1 - rows, torch.where(rows >= h, 2 * h - 1 - rows, rows))
    src_col = torch.where(across, cols + w // 2, cols) % w
    return (src_row * w + src_col).flatten().to(device)


@functools.lru_cache(maxsize=64)
def _upsampled_source_index(h: int, w: int, p: int, pole: bool, device: torch.device
                            ) -> Tensor:
    """:func:`_source_index` of the 2x nearest-neighbour upsampled ``2H x 2W`` grid, mapped
    back to flat indices of the ``H x W`` grid (upsampled cell ``(r, c)`` is ``(r//2, c//2)``)."""
    up = _source_index(2 * h, 2 * w, p, pole, torch.device("cpu"))
    return ((up // (2 * w)) // 2 * w + (up % (2 * w)) // 2).to(device)


@functools.lru_cache(maxsize=256)
def _halo_index(h: int, w: int, p: int, pole: bool, device: torch.device
                ) -> tuple[Tensor, Tensor]:
    """Where each halo cell of the padded grid comes from.

    Returns flat indices ``(dst, src)`` into the padded grid ``(H + 2 ph) x (W + 2 p)``
    (``ph = p`` with pole padding, else 0): halo cell ``dst[k]`` is a copy of the interior
    cell ``src[k]``.
    """
    ph = p if pole else 0
    rows = torch.arange(h + 2 * ph)[:, None]
    cols = torch.arange(w + 2 * p)[None, :]
    halo = ((rows < ph) | (rows >= ph + h) | (cols < p) | (cols >= p + w)).flatten()
    dst = torch.arange(halo.numel())[halo]
    src_x = _source_index(h, w, p, pole, torch.device("cpu"))[halo]
    src = (src_x // w + ph) * (w + 2 * p) + src_x % w + p
    return dst.to(device), src.to(device)


def _sphere_pad_traceable(x: Tensor, p: int, pole: bool) -> Tensor:
    """:class:`_SpherePad` (without the fused SiLU) in plain differentiable tensor operations.

    Same output as ``_SpherePad.apply(x, p, pole, False)``: the ``p`` rows beyond a pole are
    the edge rows in reverse order rolled by ``W / 2``, then every row is extended
    circularly. Slow in eager mode (each ``cat`` copies the whole tensor), fused into one
    kernel by ``torch.compile``.
    """
    if pole:
        w = x.shape[-1]
        south = x[..., :p, :].flip(-2).roll(w // 2, -1)                 # rows -p..-1
        north = x[..., -p:, :].flip(-2).roll(w // 2, -1)                # rows H..H+p-1
        x = torch.cat([south, x, north], dim=-2)
    return torch.cat([x[..., -p:], x, x[..., :p]], dim=-1)


_GATHER_BELOW = 65536
"""CPU tensors with fewer values per sample are padded by one index gather, not strips."""


_UPSAMPLE_GATHER_BELOW = 131072
"""CPU tensors with fewer values per sample are upsampled by one index gather, not
``F.interpolate``, also where no halo is added (:meth:`LatLonPad.explicit_upsampled`)."""


def _gathers(x: Tensor) -> bool:
    """Whether :func:`_sphere_pad` pads ``x`` by one gather (small CPU tensors).

    Decided per sample, so the path (and SiLU's last bit: vectorised there, written strided
    into the padded tensor otherwise) does not depend on the batch size.
    """
    return x.device.type == "cpu" and x[0].numel() < _GATHER_BELOW


def _gather_grid(x: Tensor, src: Tensor, rows: int, cols: int) -> Tensor:
    """``(*lead, rows, cols)`` grid whose cell ``k`` is cell ``src[k]`` (flat index) of the
    ``H x W`` grid of ``x``. Gathered along dim 1 of a ``(B * C, H * W)`` view: 3-5x faster
    on CPU than along the last dim of ``(B, C, H * W)``, which TensorIterator splits into
    B x C small loops."""
    *lead, h, w = x.shape
    return x.reshape(-1, h * w).index_select(1, src).view(*lead, rows, cols)


def _sphere_pad(x: Tensor, p: int, pole: bool, silu: bool) -> Tensor:
    """``x`` (or ``silu(x)``) ``(*lead, H, W)`` with its circular / cross-pole halo.

    The interior is written into a preallocated tensor (``silu`` computed straight into it,
    so the padding costs no extra pass over the data), then the halo is filled from it: on
    CPU by strided copies of whole strips (:func:`_fill_halo_strips`, four copies for a
    one-cell halo; on 2 cores 0.45-0.95x the time of the index version from 128 x 8x16 to
    32 x 32x64 cells per sample), elsewhere by one gather and one scatter of precomputed
    indices (:func:`_fill_halo_index`: fewer kernel launches, measured 15 % faster per H100
    training step than strips). Small CPU tensors (below ``_GATHER_BELOW`` values per sample,
    the low-resolution levels) are instead padded by one gather of :func:`_source_index`.
    """
    *lead, h, w = x.shape
    ph = p if pole else 0
    if _gathers(x):
        # small grids: one gather builds the whole padded tensor; there per-operation
        # overhead, not bytes, dominates (2 cores, SiLU included: 20-190 vs 83-220 us for
        # the strips from 4 x 2 K to 4 x 48 K values; the strips win from 4 x 64 K).
        # Differentiable as it stands: autograd's index_add_ backward with SiLU's own beats
        # _SpherePad's Python backward there (forward + backward 276-581 vs 377-651 us at
        # 4 x 16-48 K)
        return _gather_grid(F.silu(x) if silu else x, _source_index(h, w, p, pole, x.device),
                            h + 2 * ph, w + 2 * p)
    out = x.new_empty(*lead, h + 2 * ph, w + 2 * p)                      # (B, C, H+2ph, W+2p)
    core = out[..., ph:ph + h, p:p + w]                                   # (B, C, H, W) view
    if silu:
        torch.ops.aten.silu.out(x, out=core)
    else:
        core.copy_(x)
    fill = _fill_halo_strips if out.device.type == "cpu" else _fill_halo_index
    return fill(out, p, pole)


def _flat_halo(padded: Tensor, p: int, pole: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``padded`` viewed as ``(B, C, cells)`` and its :func:`_halo_index` ``(dst, src)``."""
    *lead, hp, wp = padded.shape
    ph = p if pole else 0
    dst, src = _halo_index(hp - 2 * ph, wp - 2 * p, p, pole, padded.device)
    return padded.view(*lead, -1), dst, src


def _fill_halo_index(out: Tensor, p: int, pole: bool) -> Tensor:
    """:func:`_fill_halo_strips` by one gather and one scatter of :func:`_halo_index`."""
    flat, dst, src = _flat_halo(out, p, pole)
    flat.index_copy_(-1, dst, flat.index_select(-1, src))
    return out


Strip = tuple[tuple[int, ...], tuple[int, ...], int]
"""``(size, stride, offset)`` of a strided view (``Tensor.as_strided``), offset relative."""


@functools.lru_cache(maxsize=1024)
def _strip_geometry(shape: tuple[int, ...], strides: tuple[int, ...], p: int, pole: bool
                    ) -> tuple[tuple[Strip, Strip], ...]:
    """``(halo, source)`` strided-view geometries of the halo of a padded tensor.

    ``shape`` / ``strides`` are those of the padded tensor ``(*lead, H + 2 ph, W + 2 p)``
    (``ph = p`` with pole padding, else 0). In fill order: the rows beyond both poles
    (interior columns only) first, then the longitude halo of every row, which also fills
    the corners. The ``k``-th row beyond a pole is interior row ``k`` from that pole rolled
    by ``W / 2``: two half-rows, both poles in one strided view (row by row where the two
    source rows coincide or cross over, fewer than ``2 k + 2`` rows). Cached per shape, so
    a fill or fold costs only its copies (building the views in Python took 18 us a call).
    """
    if strides[-1] != 1:
        raise ValueError(f"halo strips need unit column stride, got strides {strides}")
    *lead, hp, wp = shape
    lead_strides, row = strides[:-2], strides[-2]
    ph = p if pole else 0
    h, w = hp - 2 * ph, wp - 2 * p
    half = w // 2
    pairs: list[tuple[Strip, Strip]] = []
    for k in range(p if pole else 0):
        south_halo, south_src = p - 1 - k, p + k             # north rows: + (h + 1 + 2k), + gap
        gap = h - 1 - 2 * k                                  # rows from south_src to north src
        for d_col, s_col in ((p, p + half), (p + half, p)):
            if gap > 0:
                size = (*lead, 2, half)
                pairs.append(((size, (*lead_strides, (h + 1 + 2 * k) * row, 1),
                               south_halo * row + d_col),
                              (size, (*lead_strides, gap * row, 1), south_src * row + s_col)))
            else:
                size = (*lead, half)
                for d_row, s_row in ((south_halo, south_src), (p + h + k, p + h - 1 - k)):
                    pairs.append(((size, (*lead_strides, 1), d_row * row + d_col),
                                  (size, (*lead_strides, 1), s_row * row + s_col)))
    size, stride = (*lead, hp, p), (*lead_strides, row, 1)
    pairs.append(((size, stride, 0), (size, stride, w)))
    pairs.append(((size, stride, w + p), (size, stride, p)))
    return tuple(pairs)


def _strips(t: Tensor, p: int, pole: bool) -> list[tuple[Tensor, Tensor]]:
    """The ``(halo, source)`` view pairs of :func:`_strip_geometry` on ``t``."""
    base = t.storage_offset()
    return [(t.as_strided(dsize, dstride, base + doff), t.as_strided(ssize, sstride, base + soff))
            for (dsize, dstride, doff), (ssize, sstride, soff)
            in _strip_geometry(tuple(t.shape), t.stride(), p, pole)]


def _fill_halo_strips(out: Tensor, p: int, pole: bool) -> Tensor:
    """Fill the halo of a contiguous padded ``out`` ``(*lead, H + 2 ph, W + 2 p)`` in place
    by strided copies of whole strips (:func:`_strip_geometry`)."""
    for halo, source in _strips(out, p, pole):
        halo.copy_(source)
    return out


def _fold_halo_strips(grad: Tensor, p: int, pole: bool) -> Tensor:
    """Adjoint of :func:`_fill_halo_strips`, in place on a contiguous ``grad`` of the padded
    grid: each halo cell's gradient is added onto the cell it was copied from, in the
    reverse order of the fill (the corners land on the rows beyond the poles first)."""
    for halo, source in reversed(_strips(grad, p, pole)):
        source.add_(halo)
    return grad


def _fold_halo_index(grad: Tensor, p: int, pole: bool) -> Tensor:
    """:func:`_fold_halo_strips` by one gather and one ``index_add_`` of :func:`_halo_index`."""
    flat, dst, src = _flat_halo(grad, p, pole)
    flat.index_add_(-1, src, flat.index_select(-1, dst))
    return grad


class _SpherePad(torch.autograd.Function):
    """Circular longitude (and cross-pole latitude) padding of ``x`` or of ``silu(x)``.

    Forward is :func:`_sphere_pad`; backward folds the halo gradients onto the cells they
    were copied from, in place in the incoming gradient of the padded grid (the
    convolution's fresh ``grad_input``; copied first unless ``fresh_grad``, or if it is a
    view or not contiguous), by strided strips on CPU (:func:`_fold_halo_strips`) and one
    ``index_add_`` elsewhere (:func:`_fold_halo_index`), then crops it, through
    ``silu_backward`` when the SiLU was fused: one pass over the data besides the strips,
    where autograd through slice assignments would clone the whole gradient once per
    assignment. Without gradients :meth:`LatLonPad.explicit` calls :func:`_sphere_pad`
    directly (no autograd node).
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: int, pole: bool, silu: bool, fresh_grad: bool = False
                ) -> Tensor:
        ctx.p, ctx.pole, ctx.silu, ctx.fresh_grad = p, pole, silu, fresh_grad
        if silu:
            ctx.save_for_backward(x)
        return _sphere_pad(x, p, pole, silu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        p, pole, silu = ctx.p, ctx.pole, ctx.silu
        ph = p if pole else 0
        *lead, hp, wp = grad.shape
        h, w = hp - 2 * ph, wp - 2 * p
        if not ctx.fresh_grad or grad._base is not None or not grad.is_contiguous():
            grad = grad.clone(memory_format=torch.contiguous_format)
        fold = _fold_halo_strips if grad.device.type == "cpu" else _fold_halo_index
        core = fold(grad, p, pole)[..., ph:ph + h, p:p + w]              # (B, C, H, W) view
        if silu:
            return (torch.ops.aten.silu_backward(core, ctx.saved_tensors[0]), None, None,
                    None, None)
        return core.contiguous(), None, None, None, None


class LatLonConv2d(nn.Conv2d):
    """A 2-D convolution of the grid padded by its :class:`LatLonPad` (``self.pad``).

    Same parameters as :class:`torch.nn.Conv2d` (square, odd ``kernel_size``; any ``stride``)
    plus the grid ``topology``; the output is the convolution of ``self.pad(x)`` with no
    further padding: ``(H + 2 pad - k) // stride + 1`` rows, likewise columns. Zero padding
    is left to the convolution itself (no copy); only circular / cross-pole halos are copied.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 topology: GridTopology, stride: int = 1, bias: bool = True) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"{kernel_size=} must be odd so the padding is symmetric")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         bias=bias)
        self.pad = LatLonPad(kernel_size // 2, topology)

    def forward(self, x: Tensor, silu: bool = False, upsample: bool = False) -> Tensor:
        """Convolve ``x`` ``(B, C_in, H, W)`` -> ``(B, C_out, H', W')``.

        ``silu=True`` convolves ``silu(x)`` instead, the activation fused with the padding;
        ``upsample=True`` convolves ``x`` upsampled 2x by nearest neighbour, the upsampling
        fused with the padding (:meth:`LatLonPad.explicit_upsampled`).
        """
        if upsample:
            padded = self.pad.explicit_upsampled(F.silu(x) if silu else x)
        else:
            padded = self.pad.explicit(x, silu, fresh_grad=True)  # conv's grad_input is fresh
        return F.conv2d(padded, self.weight, self.bias, self.stride, self.pad.implicit)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution computed as one matrix product per sample (``torch.baddbmm``).

    Same parameters and state-dict entries as ``nn.Conv2d(in_channels, out_channels, 1)``.
    Why not the convolution itself: on CPU oneDNN's 1x1 convolution took 1.2-1.8x the time
    of this product forward and 1.3-2.8x forward + backward at the UNet's skip and attention
    shapes (2 cores, torch 2.13; ``benchmarks/bench_model.py``). Why not ``F.linear`` over all
    ``B x H x W`` points: one big GEMM blocks its rows by the batch size, so a sample's output
    would depend on which batch it is in; here every sample is its own product of one fixed
    shape, so the result of a sample does not depend on the batch size (tested).
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H, W)``."""
        b, c, h, w = x.shape
        weight = self.weight[:, :, 0, 0].expand(b, -1, -1)                   # (B, O, C_in)
        flat = x.reshape(b, c, h * w)                                          # (B, C_in, HW)
        if self.bias is None:
            out = torch.bmm(weight, flat)
        else:
            out = torch.baddbmm(self.bias[:, None], weight, flat)
        return out.reshape(b, -1, h, w)


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal features of the scalar noise label, followed by a two-layer MLP.

    The label is a DDPM timestep ``t`` in ``[0, T]`` (Ho et al. 2020) or EDM's
    ``c_noise = ln(sigma) / 4`` in about ``[-1.6, 1.2]`` (Karras et al. 2022, table 1). One
    embedding serves both: the ``features // 2`` angular frequencies are geometrically spaced
    over ``[min_freq, max_freq] = [1e-4, 1e2]`` rad per unit of label (Vaswani et al. 2017,
    sec. 3.5, with the range widened upwards). The slowest period, ``2 pi 1e4``, exceeds any
    DDPM horizon, so timesteps are never aliased; the fastest resolves ``c_noise`` to about
    0.01, a 4 % change of sigma.

    Parameters
    ----------
    features
        Number of sinusoidal features (even).
    dim
        Output embedding width.
    """

    def __init__(self, features: int, dim: int, *, min_freq: float = 1e-4,
                 max_freq: float = 1e2) -> None:
        super().__init__()
        if features % 2 or features < 2:
            raise ValueError(f"{features=} must be a positive even number")
        exponents = torch.linspace(0.0, 1.0, features // 2, dtype=torch.float64)
        freqs = min_freq * (max_freq / min_freq) ** exponents                 # (features/2,)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, noise_label: Tensor) -> Tensor:
        """``[cos(f_k t), sin(f_k t)]`` of ``noise_label`` ``(B,)`` -> ``(B, features)``."""
        angles = noise_label.float()[:, None] * self.freqs[None, :]         # (B, features/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(self, noise_label: Tensor) -> Tensor:
        """Embedding ``(B, dim)`` of ``noise_label`` ``(B,)``."""
        return self.mlp(self.features(noise_label).to(self.mlp[0].weight.dtype))


class ConditionEmbedding(nn.Module):
    """MLP embedding of a condition vector with a learned null embedding.

    ``forward(cond, drop)`` returns ``mlp(cond)`` where ``drop`` is False and the learned
    ``null`` vector where it is True, the "unconditional" model of classifier-free guidance
    (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", algorithm 1).

    Parameters
    ----------
    cond_dim
        Length of the condition vector.
    dim
        Output embedding width.
    """

    def __init__(self, cond_dim: int, dim: int) -> None:
        super().__init__()
        if cond_dim < 1:
            raise ValueError(f"{cond_dim=} must be >= 1")
        self.mlp = nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, cond: Tensor | None, drop: Tensor | None) -> Tensor:
        """Embedding ``(B, dim)`` of ``cond`` ``(B, cond_dim)``; ``drop`` ``(B,)`` bool.

        ``cond`` may be ``None`` only when every entry of ``drop`` is True.
        """
        if cond is None:
            assert drop is not None and bool(drop.all())
            return self.null.expand(drop.shape[0], -1)                      # (B, dim)
        emb = self.mlp(cond)                                                # (B, dim)
        if drop is None:
            return emb
        return torch.where(drop[:, None], self.null.to(emb.dtype), emb)


class ResBlock(nn.Module):
    """Residual block ``x + conv(act(norm(conv(act(norm(x))), emb)))`` (Ho et al. 2020, app. B).

    The embedding enters after the second group norm, either as a scale and shift
    ``h * (1 + scale) + shift`` (Dhariwal & Nichol 2021, sec. 3) or added, ``h + proj(emb)``.

    Parameters
    ----------
    in_channels, out_channels
        Widths; a 1x1 convolution maps the skip path when they differ.
    emb_dim
        Width of the noise(+condition) embedding.
    topology
        Grid periodicity used by every convolution.
    groups
        Group-norm groups (divides both widths).
    dropout
        Dropout probability before the second convolution.
    scale_shift
        Scale-shift injection (True) or additive injection (False).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *,
                 topology: GridTopology, groups: int, dropout: float = 0.0,
                 scale_shift: bool = True) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = LatLonConv2d(in_channels, out_channels, 3, topology=topology)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = LatLonConv2d(out_channels, out_channels, 3, topology=topology)
        self.skip = (PointwiseConv2d(in_channels, out_channels) if in_channels != out_channels
                     else nn.Identity())

    def embedding_terms(self, emb: Tensor) -> EmbeddingTerms:
        """This block's injection of ``emb`` ``(B, emb_dim)``, see :data:`EmbeddingTerms`
        and :func:`embedding_terms` (which computes those of many blocks at once)."""
        return embedding_terms([self], emb)[0]

    def forward(self, x: Tensor, emb: Tensor, terms: EmbeddingTerms | None = None) -> Tensor:
        """``x`` ``(B, C_in, H, W)``, ``emb`` ``(B, emb_dim)`` -> ``(B, C_out, H, W)``.

        ``terms``: this block's :meth:`embedding_terms` of ``emb`` when already computed
        (:func:`embedding_terms` of all blocks of a network); ``emb`` is then not used.
        """
        h = self.conv1(self.norm1(x), silu=True)
        if terms is None:
            terms = self.embedding_terms(emb)
        if self.scale_shift:
            mul, add = terms                                                 # (B, C_out, 1, 1)
            norm = self.norm2
            normed = F.group_norm(h, norm.num_groups, None, None, norm.eps)
            h = torch.addcmul(add, normed, mul)
        else:
            h = self.norm2(h + terms)
        if self.dropout.p > 0 and self.training:
            h = self.conv2(self.dropout(F.silu(h)))
        else:
            h = self.conv2(h, silu=True)
        return self.skip(x) + h


EmbeddingTerms = tuple[Tensor, Tensor] | Tensor
"""How a :class:`ResBlock` injects the embedding: ``(mul, add)``, each ``(B, C_out, 1, 1)``,
with scale-shift (``h = normalised(h) * mul + add``), else the term added before the
second group norm."""


def embedding_terms(blocks: Sequence[ResBlock], emb: Tensor) -> list[EmbeddingTerms]:
    """:meth:`ResBlock.embedding_terms` of every block in ``blocks`` from one matrix product.

    With scale-shift, norm2's affine is folded into the per-sample scale and shift (tiny
    ``(B, C)`` maths, one pass over the activations after the normalisation instead of
    two): ``(n gamma + beta)(1 + scale) + shift = n [gamma (1 + scale)] + [beta (1 + scale)
    + shift]``. The blocks' projection weights (and norm2 affines) are concatenated, so the
    SiLU, the projection and the scale-shift maths run once for the network instead of once
    per block: each of these ops on a ``(B, C)`` tensor costs its fixed overhead, which
    dominated them (11 blocks of widths 32-64, batch 4, 2 cores: 0.20 vs 0.75 ms without
    gradients, 1.2 vs 2.9 ms with). A single block (:meth:`ResBlock.embedding_terms`) is the
    one-element case; many blocks give its values up to the summation order of the product.
    """
    if not blocks:
        return []
    scale_shift = blocks[0].scale_shift
    if any(b.scale_shift != scale_shift for b in blocks):
        return [embedding_terms([b], emb)[0] for b in blocks]
    weight = torch.cat([b.emb_proj.weight for b in blocks])                 # (sum C', emb)
    bias = torch.cat([b.emb_proj.bias for b in blocks])
    e = F.linear(F.silu(emb), weight, bias)                                 # (B, sum C')
    widths = [b.norm2.num_channels for b in blocks]
    if not scale_shift:
        return list(e[:, :, None, None].split(widths, dim=1))
    # block k's slice of e is [scale_k, shift_k]: reorder to all scales, then all shifts
    order = _scale_shift_order(tuple(widths), e.device)
    scale, shift = e.index_select(1, order).view(e.shape[0], 2, -1).unbind(1)   # (B, S)
    one_scale = 1 + scale
    gamma = torch.cat([b.norm2.weight for b in blocks])                     # (S,)
    beta = torch.cat([b.norm2.bias for b in blocks])
    mul = (gamma * one_scale)[:, :, None, None].split(widths, dim=1)
    add = torch.addcmul(shift, beta, one_scale)[:, :, None, None].split(widths, dim=1)
    return list(zip(mul, add, strict=True))


@functools.lru_cache(maxsize=64)
def _scale_shift_order(widths: tuple[int, ...], device: torch.device) -> Tensor:
    """Column order that turns ``[scale_1, shift_1, scale_2, shift_2, ...]`` (block widths
    ``widths``) into ``[scale_1, scale_2, ..., shift_1, shift_2, ...]``."""
    starts = torch.tensor([0, *widths[:-1]]).cumsum(0) * 2
    scales = torch.cat([s + torch.arange(w) for s, w in zip(starts.tolist(), widths,
                                                              strict=True)])
    shifts = torch.cat([s + w + torch.arange(w) for s, w in zip(starts.tolist(), widths,
                                                                  strict=True)])
    return torch.cat([scales, shifts]).to(device)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over all grid points, ``x + proj(attn(norm(x)))``.

    Attention is permutation equivariant, so it keeps the longitude equivariance of the
    convolutions; position enters through the input coordinate channels. Uses
    :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
    kernels where available), except on CPU over at most ``_EXPLICIT_ATTENTION_UP_TO``
    grid points, where two explicit batched products are faster
    (:func:`_attention_channels_first`).

    Parameters
    ----------
    channels
        Width (divisible by ``heads`` and ``groups``).
    heads
        Number of attention heads.
    groups
        Group-norm groups.
    topology
        Grid periodicity (unused: attention and 1x1 convolutions need no padding; kept so
        every block takes the same arguments).
    """

    def __init__(self, channels: int, heads: int, *, groups: int,
                 topology: GridTopology) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention width {channels=} is not divisible by {heads=}; "
                             "choose attention_heads dividing every attended width")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = PointwiseConv2d(channels, 3 * channels)
        self.proj = PointwiseConv2d(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))                                        # (B, 3C, H, W)
        if (x.device.type == "cpu" and h * w <= _EXPLICIT_ATTENTION_UP_TO
                and not torch.compiler.is_compiling()):
            d = c // self.heads
            q, k, v = qkv.reshape(b, 3, self.heads * d, h * w).unbind(1)   # (B, C, HW) x3
            out = _attention_channels_first(q.reshape(-1, d, h * w), k.reshape(-1, d, h * w),
                                            v.reshape(-1, d, h * w))       # (B n, d, HW)
            return x + self.proj(out.view(b, c, h, w))
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, h * w)         # (B, 3, n, d, HW)
        # head dim made contiguous (one copy of the small low-resolution qkv): the fused
        # (flash) attention kernels need it, the unfused fallback costs more than the copy
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)              # (B, n, HW, d) x3
        out = F.scaled_dot_product_attention(q, k, v)                       # (B, n, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)                     # (B, C, H, W)
        return x + self.proj(out)


_EXPLICIT_ATTENTION_UP_TO = 128
"""CPU attention over at most this many grid points runs as two explicit batched products
(:func:`_attention_channels_first`), above it as ``scaled_dot_product_attention``."""


def _attention_channels_first(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention ``v softmax(q^T k / sqrt(d))^T`` of ``(N, d, L)`` queries, keys and
    values, returned ``(N, d, L)``: the UNet's channels-first layout in and out.

    Why not ``scaled_dot_product_attention``: it wants ``(N, L, d)`` (two transposing copies)
    and its CPU flash kernel is built for long sequences; at the UNet's coarsest levels
    (L <= 128 points) the explicit products took 0.75-0.85x its time forward + backward
    (2 cores: 4 x 64 channels at 4x8 and 8x16, 16 x 256 at 8x16). From 256 points on the
    explicit products took 1.06-1.67x the flash kernel's time in all but one case measured
    (16 x 256 at 16x16 forward + backward: 0.86x), so the kernel is used there. Explicit
    attention stores the ``(N, L, L)`` weights: at most 128 x 128 values per head here.
    """
    scores = torch.bmm(q.transpose(1, 2), k * q.shape[1] ** -0.5)           # (N, L, L)
    return torch.bmm(v, scores.softmax(dim=-1).transpose(1, 2))              # (N, d, L)


class Downsample(nn.Module):
    """Halve the grid with a stride-2 3x3 :class:`LatLonConv2d` (Ho et al. 2020, app. B)."""

    def __init__(self, channels: int, *, topology: GridTopology) -> None:
        super().__init__()
        self.conv = LatLonConv2d(channels, channels, 3, topology=topology, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H / 2, W / 2)``."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double the grid: nearest-neighbour upsampling, then a 3x3 :class:`LatLonConv2d`."""

    def __init__(self, channels: int, *, topology: GridTopology) -> None:
        super().__init__()
        self.conv = LatLonConv2d(channels, channels, 3, topology=topology)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, 2 H, 2 W)``."""
        return self.conv(x, upsample=True)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (and return it)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module

