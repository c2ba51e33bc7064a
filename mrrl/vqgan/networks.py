"""3D VQGAN generator: MONAI's VQ-VAE encoder/decoder around mrrl's chunked EMA quantiser.

Conventions:
- input volumes are ``[B, C, D, H, W]`` floats in ``[-1, 1]`` (C = MRI modalities);
- latents are ``[B, codebook_dim, D/f, H/f, W/f]``; every spatial size must be divisible by ``f``;
- the decoder output is **unconstrained** (no tanh) by default: a tanh saturates, which slows the L1 fit of
  the background (exactly -1) and hides how far decoded diffusion samples stray outside the data range.
  Clamp to ``[-1, 1]`` for metrics and images; ``output_act="TANH"`` is available.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from monai.networks.nets import VQVAE
from torch import nn

from mrrl.training.speed import enable_activation_checkpointing
from mrrl.vqgan.quantizer import QuantizerOutput, VectorQuantizerEMA

# MONAI (stride, kernel, dilation, padding[, output_padding]): k4/s2/p1 halves an even size exactly and its
# transpose doubles it; k3/s1/p1 keeps the size.
_DOWN, _DOWN_KEEP = (2, 4, 1, 1), (1, 3, 1, 1)
_UP, _UP_KEEP = (2, 4, 1, 1, 0), (1, 3, 1, 1, 0)


@dataclass
class VQGANConfig:
    """Generator hyper-parameters (the Hydra ``stage`` config passes these as kwargs).

    ``channels`` has one entry per resolution level; the first ``log2(downsample_factor)`` levels halve every
    spatial axis, any further levels keep the resolution. ``num_res_channels`` defaults to ``channels``.
    ``gradient_checkpointing`` (read when the network is built) keeps only the encoder's and the decoder's
    inputs of a training-mode forward and recomputes each of the two in the backward pass
    (:func:`mrrl.training.speed.enable_activation_checkpointing`).
    """

    in_channels: int = 1
    channels: Sequence[int] = (64, 128)
    num_res_blocks: int = 2
    num_res_channels: Sequence[int] | None = None
    downsample_factor: int = 4
    codebook_size: int = 512
    codebook_dim: int = 8
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    commitment_cost: float = 0.25
    dead_code_threshold: float = 1.0
    quantize_chunk_size: int = 32768
    act: str = "RELU"
    dropout: float = 0.0
    output_act: str | None = None
    gradient_checkpointing: bool = False
    sync_ddp: bool = True

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # Hydra passes ListConfig
        if self.num_res_channels is not None:
            self.num_res_channels = tuple(int(c) for c in self.num_res_channels)
            if len(self.num_res_channels) != len(self.channels):
                raise ValueError("num_res_channels needs one entry per level of channels")
        factor = int(self.downsample_factor)
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"downsample_factor must be a power of two, got {self.downsample_factor}")
        if len(self.channels) < self.num_downsamplings:
            raise ValueError(
                f"downsample_factor={factor} needs at least {self.num_downsamplings} levels in channels, "
                f"got channels={list(self.channels)}"
            )

    @property
    def num_downsamplings(self) -> int:
        return int(math.log2(int(self.downsample_factor)))


class VQGANOutput(NamedTuple):
    """``VQGAN.forward`` result: reconstruction ``[B, C, D, H, W]``, scalar ``vq_loss`` (commitment),
    code ``indices`` ``[B, d, h, w]`` and quantiser ``stats`` (perplexity, usage, restarted)."""

    reconstruction: torch.Tensor
    vq_loss: torch.Tensor
    indices: torch.Tensor
    stats: dict[str, torch.Tensor]


class VQGAN(nn.Module):
    """VQGAN generator usable without Lightning.

    Build with ``VQGAN(**kwargs)`` (keys of :class:`VQGANConfig`) or ``VQGAN(config)``.
    ``encode``/``decode``/``reconstruct`` never update the codebook; ``forward`` updates it in training mode.
    """

    def __init__(self, config: VQGANConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either a VQGANConfig or keyword arguments, not both")
        self.config = cfg = config if config is not None else VQGANConfig(**kwargs)
        levels = len(cfg.channels)
        down = [_DOWN if i < cfg.num_downsamplings else _DOWN_KEEP for i in range(levels)]
        # MONAI's decoder walks the levels deepest first, so the keep-size levels come first there.
        up = [_UP_KEEP if i < levels - cfg.num_downsamplings else _UP for i in range(levels)]
        base = VQVAE(
            spatial_dims=3,
            in_channels=cfg.in_channels,
            out_channels=cfg.in_channels,
            channels=cfg.channels,
            num_res_layers=cfg.num_res_blocks,
            num_res_channels=cfg.num_res_channels or cfg.channels,
            downsample_parameters=tuple(down),
            upsample_parameters=tuple(up),
            num_embeddings=cfg.codebook_size,
            embedding_dim=cfg.codebook_dim,
            act=cfg.act,
            dropout=cfg.dropout,
            output_act=cfg.output_act,
        )
        # Keep MONAI's encoder/decoder; its one-hot EMA quantiser is replaced by the chunked one.
        self.encoder = base.encoder
        self.decoder = base.decoder
        self.quantizer = VectorQuantizerEMA(
            codebook_size=cfg.codebook_size,
            code_dim=cfg.codebook_dim,
            decay=cfg.ema_decay,
            epsilon=cfg.ema_epsilon,
            commitment_cost=cfg.commitment_cost,
            dead_code_threshold=cfg.dead_code_threshold,
            chunk_size=cfg.quantize_chunk_size,
            sync_ddp=cfg.sync_ddp,
        )
        convs = [n for n, m in self.decoder.named_modules() if isinstance(m, nn.ConvTranspose3d | nn.Conv3d)]
        self._last_layer_name = f"decoder.{convs[-1]}"
        if cfg.gradient_checkpointing:
            # Two segments, encoder and decoder: MONAI's blocks are single convolutions or residual units whose
            # inputs are most of what they save, so per-block checkpoints free little. CPU, batch 2 at 64³,
            # channels [32, 64] with 2 residual units: peak growth 127 MiB plain, 95 per block, 77 per half.
            enable_activation_checkpointing(self, [self.encoder, self.decoder])

    @property
    def downsample_factor(self) -> int:
        return int(self.config.downsample_factor)

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """Weight of the decoder's last convolution (for the adaptive adversarial weight)."""
        return self.get_submodule(self._last_layer_name).weight

    def hparams(self) -> dict[str, Any]:
        """The config as a plain dict (for checkpoints and loggers)."""
        return asdict(self.config)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape for an image shape: ``(D, H, W)`` or ``(C, D, H, W)`` -> ``(code_dim, d, h, w)``;
        ``(B, C, D, H, W)`` -> ``(B, code_dim, d, h, w)``."""
        shape = tuple(int(s) for s in image_shape)
        if len(shape) not in (3, 4, 5):
            raise ValueError(f"expected (D, H, W), (C, D, H, W) or (B, C, D, H, W), got {shape}")
        if len(shape) >= 4 and shape[-4] != self.config.in_channels:
            raise ValueError(f"image has {shape[-4]} channels, the VQGAN expects {self.config.in_channels}")
        spatial = shape[-3:]
        self._check_spatial(spatial)
        latent = (self.config.codebook_dim, *(s // self.downsample_factor for s in spatial))
        return (shape[0], *latent) if len(shape) == 5 else latent

    def _check_spatial(self, spatial: Sequence[int]) -> None:
        f = self.downsample_factor
        if any(s % f for s in spatial):
            raise ValueError(
                f"every spatial size must be divisible by the downsample factor {f}, got {tuple(spatial)}"
            )

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output ``z_e`` ``[B, code_dim, d, h, w]``."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected [B, {self.config.in_channels}, D, H, W] volumes, got {tuple(x.shape)}"
            )
        self._check_spatial(x.shape[2:])
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantise latents; ``update`` (default: training mode) decides whether the EMA codebook moves."""
        return self.quantizer(z_e, update=update)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latents ``[B, code_dim, d, h, w]`` (continuous code vectors: what the diffusion model sees)."""
        return self.quantize(self.encode_pre_quant(x), update=False).quantized

    def decode(self, z: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Decode latents to volumes; ``quantize=True`` snaps un-quantised latents (diffusion samples) to codes."""
        if quantize:
            z = self.quantize(z, update=False).quantized
        return self.decoder(z)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode ``[B, d, h, w]`` code indices."""
        return self.decode(self.quantizer.embed(indices))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` without touching the codebook."""
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        q = self.quantize(self.encode_pre_quant(x))
        return VQGANOutput(self.decode(q.quantized), q.loss, q.indices, q.stats)
