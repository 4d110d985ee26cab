"""The lat-lon UNet: a diffusion denoising network for (non-square) global or regional grids.

Architecture after Ho et al. (2020, appendix B) and Dhariwal & Nichol (2021, sec. 3): an
encoder of residual blocks with stride-2 downsampling, a middle block, and a decoder that
concatenates the encoder activations (skip connections) and upsamples by nearest neighbour.
Every convolution and resampling layer pads through :class:`geodiff.nn.LatLonPad`, so on a
global grid the network is equivariant to longitude shifts by multiples of its coarsest
stride and has no seam at the date line (see :mod:`geodiff.nn`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from geodiff.nn import (
    ConditionEmbedding,
    Downsample,
    GridTopology,
    LatLonConv2d,
    NoiseLevelEmbedding,
    ResBlock,
    SelfAttention2d,
    Upsample,
    embedding_terms,
    zero_init,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from geodiff.config import ModelConfig


class _Level(nn.Module):
    """Residual blocks of one resolution level, block ``j`` followed by attention if
    ``attention[j]``."""

    def __init__(self, in_widths: Sequence[int], out_channels: int, emb_dim: int, *,
                 attention: Sequence[bool], heads: int, groups: int, dropout: float,
                 scale_shift: bool, topology: GridTopology) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(c_in, out_channels, emb_dim, topology=topology, groups=groups,
                     dropout=dropout, scale_shift=scale_shift) for c_in in in_widths)
        self.attns = nn.ModuleList(
            SelfAttention2d(out_channels, heads, groups=groups, topology=topology)
            if attend else nn.Identity() for attend in attention)


class LatLonUNet(nn.Module):
    """Denoising UNet on a ``(lat, lon)`` grid with noise-level and condition embeddings.

    Parameters
    ----------
    in_channels
        Input channels: the noisy state plus any extra input fields concatenated to it.
    out_channels
        Output channels (the network's prediction target).
    channels
        Width of each resolution level; the grid is halved between consecutive levels, so
        ``H`` and ``W`` must be multiples of ``2 ** (len(channels) - 1)``.
    blocks_per_level
        Residual blocks per level in the encoder (the decoder has one more per level).
    attention_levels
        Levels (0 = full resolution) with self-attention after every residual block; the
        middle block has attention when the coarsest level is listed.
    attention_heads
        Heads of every attention layer.
    dropout
        Dropout probability inside the residual blocks.
    groups
        Group-norm groups (must divide every width).
    cond_dim
        Length of the condition vector (0 = unconditional).
    periodic_lon
        Circular padding in longitude (global grids).
    pole_padding
        Pad latitude with the rows across the pole (requires ``periodic_lon``).
    scale_shift
        Inject the embedding as scale and shift of the group norm (True) or additively.
    noise_max_freq
        Fastest angular frequency of the noise-label features (:class:`NoiseLevelEmbedding`),
        in rad per unit of label: 1e2 suits EDM's ``c_noise`` (about -1.6..1.2); a DDPM
        timestep label (0..T-1, fractional between the schedule's steps for Heun,
        DPM-Solver++ and gap filling) needs <= 1 rad per step, or the features of t + 0.5
        are unrelated to those of t and t + 1, which training on whole steps never showed.

    Notes
    -----
    The noise embedding width is ``4 * channels[0]``; the condition embedding (an MLP of the
    condition vector, or a learned null vector where ``cond_drop`` is True) is added to it.
    The final convolution is zero-initialised, so a fresh network outputs zeros.
    """

    def __init__(self, in_channels: int, out_channels: int, *,
                 channels: Sequence[int] = (64, 128, 256), blocks_per_level: int = 2,
                 attention_levels: Sequence[int] = (2,), attention_heads: int = 4,
                 dropout: float = 0.0, groups: int = 8, cond_dim: int = 0,
                 periodic_lon: bool = False, pole_padding: bool = False,
                 scale_shift: bool = True, noise_max_freq: float = 1e2) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(int(a) for a in attention_levels)
        _check_args(in_channels, out_channels, channels, blocks_per_level, attention_levels,
                    attention_heads, groups, cond_dim, dropout)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channels, self.cond_dim = channels, cond_dim
        self.topology = topo = GridTopology(periodic_lon, pole_padding)
        self.multiple = 2 ** (len(channels) - 1)
        emb_dim = 4 * channels[0]
        common = {"emb_dim": emb_dim, "heads": attention_heads, "groups": groups,
                  "dropout": dropout, "scale_shift": scale_shift, "topology": topo}

        self.noise_embedding = NoiseLevelEmbedding(channels[0], emb_dim,
                                                   max_freq=noise_max_freq)
        self.cond_embedding = ConditionEmbedding(cond_dim, emb_dim) if cond_dim else None
        self.conv_in = LatLonConv2d(in_channels, channels[0], 3, topology=topo)

        skip_widths = [channels[0]]
        self.down_levels, self.downsamples = nn.ModuleList(), nn.ModuleList()
        width = channels[0]
        for i, c in enumerate(channels):
            in_widths = [width] + [c] * (blocks_per_level - 1)
            attend = [i in attention_levels] * len(in_widths)
            self.down_levels.append(_Level(in_widths, c, attention=attend, **common))
            skip_widths += [c] * blocks_per_level
            width = c
            if i < len(channels) - 1:
                self.downsamples.append(Downsample(c, topology=topo))
                skip_widths.append(c)

        last_attn = len(channels) - 1 in attention_levels
        self.mid = _Level([width, width], width, attention=[last_attn, False], **common)

        self.up_levels, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels))):
            c = channels[i]
            in_widths = []
            for _ in range(blocks_per_level + 1):
                in_widths.append(width + skip_widths.pop())
                width = c
            attend = [i in attention_levels] * len(in_widths)
            self.up_levels.append(_Level(in_widths, c, attention=attend, **common))
            if i > 0:
                self.upsamples.append(Upsample(c, topology=topo))
        assert not skip_widths

        self.norm_out = nn.GroupNorm(groups, channels[0])
        self.conv_out = zero_init(LatLonConv2d(channels[0], out_channels, 3, topology=topo))

    @classmethod
    def from_config(cls, cfg: ModelConfig, in_channels: int, out_channels: int, cond_dim: int,
                    periodic: bool, global_lat: bool,
                    noise_max_freq: float = 1e2) -> LatLonUNet:
        """Build the network of a recipe's ``model`` section for a grid.

        ``periodic_lon``/``pole_padding`` ``"auto"`` follow the grid: circular longitude
        padding when ``periodic``, pole padding when ``periodic and global_lat`` (for data
        prepared by :func:`geodiff.pipeline.prepare_data`, ``global_lat`` says whether
        pole padding is exact there: :func:`geodiff.pipeline.pole_padding_fits`).
        """
        periodic_lon = {"auto": periodic, "yes": True, "no": False}[cfg.periodic_lon]
        pole = {"auto": periodic_lon and global_lat, "yes": True, "no": False}[cfg.pole_padding]
        if pole and not periodic_lon:
            raise ValueError(f"model.pole_padding={cfg.pole_padding!r} needs periodic "
                             f"longitudes, but model.periodic_lon={cfg.periodic_lon!r} "
                             f"(grid periodic={periodic}); set pole_padding: 'no'")
        return cls(in_channels, out_channels, channels=cfg.channels,
                   blocks_per_level=cfg.blocks_per_level, attention_levels=cfg.attention_levels,
                   attention_heads=cfg.attention_heads, dropout=cfg.dropout, groups=cfg.groups,
                   cond_dim=cond_dim, periodic_lon=periodic_lon, pole_padding=pole,
                   noise_max_freq=noise_max_freq)

    def param_count(self, trainable_only: bool = True) -> int:
        """Number of (trainable) scalar parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def embed(self, noise_label: Tensor, cond: Tensor | None, cond_drop: Tensor | None) -> Tensor:
        """Noise embedding plus condition embedding, ``(B, 4 * channels[0])``."""
        emb = self.noise_embedding(noise_label)
        if self.cond_embedding is not None:
            emb = emb + self.cond_embedding(cond, cond_drop)
        return emb

    def forward(self, x: Tensor, noise_label: Tensor, cond: Tensor | None = None,
                cond_drop: Tensor | None = None) -> Tensor:
        """Network output ``(B, out_channels, H, W)``.

        Parameters
        ----------
        x
            ``(B, in_channels, H, W)``; ``H`` and ``W`` multiples of ``2**(len(channels)-1)``.
        noise_label
            ``(B,)`` float (or a scalar for the whole batch): DDPM timestep or EDM c_noise.
        cond
            ``(B, cond_dim)`` condition vector; required when ``cond_dim > 0`` unless every
            ``cond_drop`` is True; ``None`` or ``(B, 0)`` for an unconditional network.
        cond_drop
            ``(B,)`` bool: True replaces the condition embedding by the learned null
            embedding (classifier-free guidance). Ignored when ``cond_dim == 0``.
        """
        noise_label, cond, cond_drop = self._check_inputs(x, noise_label, cond, cond_drop)
        emb = self.embed(noise_label, cond, cond_drop)
        levels = (*self.down_levels, self.mid, *self.up_levels)
        # every residual block's embedding injection at once (one matrix product)
        terms = iter(embedding_terms([b for lvl in levels for b in lvl.blocks], emb))

        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down_levels):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(h, emb, next(terms)))
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                skips.append(h)

        for block, attn in zip(self.mid.blocks, self.mid.attns, strict=True):
            h = attn(block(h, emb, next(terms)))

        for i, level in enumerate(self.up_levels):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = torch.cat([h, skips.pop()], dim=1)                      # (B, C+C_skip, .)
                h = attn(block(h, emb, next(terms)))
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(self.norm_out(h), silu=True)

    def _check_inputs(self, x: Tensor, noise_label: Tensor, cond: Tensor | None,
                      cond_drop: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x.shape={tuple(x.shape)} must be (B, in_channels="
                             f"{self.in_channels}, H, W)")
        b, _, h, w = x.shape
        if h % self.multiple or w % self.multiple:
            raise ValueError(
                f"grid H={h}, W={w}: both must be multiples of 2**(len(channels)-1) = "
                f"{self.multiple} for {len(self.channels)} levels; pad the grid "
                f"(geodiff.data.compute_padding) or use fewer levels")
        noise_label = torch.as_tensor(noise_label, device=x.device)
        if noise_label.ndim == 0:
            noise_label = noise_label.expand(b)
        if noise_label.shape != (b,):
            raise ValueError(f"noise_label.shape={tuple(noise_label.shape)} must be ({b},) or ()")
        if cond_drop is not None and cond_drop.shape != (b,):
            raise ValueError(f"cond_drop.shape={tuple(cond_drop.shape)} must be ({b},)")
        if self.cond_embedding is None:
            if cond is not None and cond.numel() != 0:
                raise ValueError(f"cond.shape={tuple(cond.shape)} given to an unconditional "
                                 "network (cond_dim=0); pass cond=None or build the network "
                                 "with cond_dim")
            return noise_label, None, None
        if cond_drop is not None:
            cond_drop = cond_drop.to(device=x.device, dtype=torch.bool)
        if cond is None:
            if cond_drop is None or not bool(cond_drop.all()):
                raise ValueError(f"cond=None but the network has cond_dim={self.cond_dim}; pass "
                                 f"cond of shape ({b}, {self.cond_dim}), or cond_drop all True "
                                 "for the unconditional (null-condition) output")
            return noise_label, None, cond_drop
        if cond.shape != (b, self.cond_dim):
            raise ValueError(f"cond.shape={tuple(cond.shape)} must be ({b}, {self.cond_dim})")
        return noise_label, cond.to(self.conv_in.weight.dtype), cond_drop


def _check_args(in_channels: int, out_channels: int, channels: tuple[int, ...],
                blocks_per_level: int, attention_levels: tuple[int, ...], heads: int,
                groups: int, cond_dim: int, dropout: float) -> None:
    """Raise ValueError for an impossible network description."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"{in_channels=} and {out_channels=} must be >= 1")
    if not channels or any(c < 1 or c % groups for c in channels):
        raise ValueError(f"{channels=} must be non-empty positive widths divisible by "
                         f"{groups=}")
    if blocks_per_level < 1:
        raise ValueError(f"{blocks_per_level=} must be >= 1")
    bad = [lvl for lvl in attention_levels if not 0 <= lvl < len(channels)]
    if bad:
        raise ValueError(f"{attention_levels=} has levels {bad} outside 0..{len(channels) - 1}")
    if heads < 1 or any(channels[lvl] % heads for lvl in attention_levels):
        raise ValueError(f"attention_heads={heads} must divide the widths "
                         f"{[channels[lvl] for lvl in attention_levels]} of attention_levels")
    if cond_dim < 0:
        raise ValueError(f"{cond_dim=} must be >= 0 (0 = unconditional)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{dropout=} must be in [0, 1)")
