"""Memory-efficient, DDP-aware EMA vector quantiser for the 3D VQGAN.

Why not MONAI's ``EMAQuantizer``: it builds the full ``N x K`` distance matrix and an ``N x K`` one-hot
matrix, which is what makes the public 3D VQGANs run out of memory at 128^3 (docs/design_notes.md, "Speed on GPUs").
Here the nearest-code search runs in chunks of rows, the EMA statistics are gathered with
``bincount``/``index_add_`` (no one-hot), and dead codes are restarted from encoder outputs.

Codebook state lives in buffers, not parameters, so optimisers never touch it; it is saved in checkpoints and
kept identical on every rank (the EMA statistics are all-reduced and restarts are broadcast from rank 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizerEMA` returns.

    Attributes:
        quantized: ``[B, code_dim, *spatial]`` float32 code vectors; straight-through (gradients flow to the
            input unchanged) when the input requires grad, the exact codebook rows otherwise.
        loss: scalar commitment loss ``beta * mean((z_e - sg(e))^2)`` (the codebook itself is learnt by EMA).
        indices: ``[B, *spatial]`` long tensor of chosen codes.
        stats: detached scalars: ``perplexity`` in ``[1, K]``, ``usage`` (fraction of codes used in the batch)
            in ``[0, 1]``, ``restarted`` (number of dead codes re-initialised by this call). When the codebook
            is updated under DDP they describe the global batch (all ranks), otherwise this rank's batch.
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    stats: dict[str, torch.Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def nearest_codes(flat: torch.Tensor, codebook: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Index of the nearest code for every row of ``flat`` ``[N, D]``, searching ``chunk_size`` rows at a time.

    Uses ``||x||^2 - 2 x.e + ||e||^2``; only a ``chunk_size x K`` block of distances exists at any time.
    Always float32 (or wider) with autocast off: under bf16 autocast ``addmm`` would round the cross term
    and pick another code for close calls, which the decoder then reconstructs differently.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    work = torch.promote_types(torch.promote_types(flat.dtype, codebook.dtype), torch.float32)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    with torch.autocast(device_type=flat.device.type, enabled=False):
        flat, codebook = flat.to(work), codebook.to(work)
        codebook_t = codebook.t()
        code_sq = codebook.pow(2).sum(1)
        for start in range(0, flat.shape[0], chunk_size):
            rows = flat[start : start + chunk_size]
            dist_sq = torch.addmm(code_sq, rows, codebook_t, beta=1.0, alpha=-2.0)
            dist_sq += rows.pow(2).sum(1, keepdim=True)
            out[start : start + chunk_size] = dist_sq.argmin(1)
    return out


class VectorQuantizerEMA(nn.Module):
    """Vector quantiser with an exponential-moving-average codebook and dead-code restart.

    Args:
        codebook_size: number of codes ``K``.
        code_dim: dimension ``D`` of each code (= latent channels).
        decay: EMA decay of the code counts and sums.
        epsilon: Laplace smoothing of the code counts (avoids division by zero for unused codes).
        commitment_cost: ``beta`` of the commitment loss.
        dead_code_threshold: a code whose EMA count (expected uses per step, summed over ranks) falls below this
            value is re-initialised from a random encoder output of the current batch; ``0`` disables restarts.
            Every code starts with an EMA count of 1, so with the default threshold of 1 the codes not chosen in
            the first training step are restarted from data (a data-dependent initialisation for free).
        chunk_size: rows per block in the nearest-code search (memory: ``chunk_size x K`` floats).
        sync_ddp: all-reduce the EMA statistics and broadcast restarts when ``torch.distributed`` is initialised.

    The codebook is updated only when ``update`` is true (default: ``self.training``); the search and the EMA run
    in float32 with autocast disabled, so bf16 training does not change which code is nearest.
    """

    def __init__(
        self,
        codebook_size: int = 512,
        code_dim: int = 8,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        commitment_cost: float = 0.25,
        dead_code_threshold: float = 1.0,
        chunk_size: int = 32768,
        sync_ddp: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        self.epsilon = epsilon
        self.commitment_cost = commitment_cost
        self.dead_code_threshold = dead_code_threshold
        self.chunk_size = chunk_size
        self.sync_ddp = sync_ddp
        embedding = torch.randn(codebook_size, code_dim)
        self.register_buffer("embedding", embedding)
        # A virtual count of 1 per code at its initial position keeps sum / count consistent from step one.
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", embedding.clone())

    @property
    def codebook(self) -> torch.Tensor:
        """The ``[K, D]`` code vectors (a buffer; read-only by convention)."""
        return self.embedding

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, decay={self.decay}, "
            f"commitment_cost={self.commitment_cost}, dead_code_threshold={self.dead_code_threshold}, "
            f"chunk_size={self.chunk_size}"
        )

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Map ``[B, *spatial]`` code indices to channel-first vectors ``[B, D, *spatial]``."""
        vectors = F.embedding(indices, self.embedding)
        return vectors.movedim(-1, 1).contiguous()

    def forward(self, z: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantise channel-first latents ``z`` ``[B, D, *spatial]``; update the codebook if ``update``."""
        if z.shape[1] != self.code_dim:
            raise ValueError(f"expected {self.code_dim} latent channels, got shape {tuple(z.shape)}")
        update = self.training if update is None else update
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = z.movedim(1, -1).reshape(-1, self.code_dim)
            codebook = self.embedding.float()
            indices = nearest_codes(flat.detach(), codebook, self.chunk_size)
            quantized = F.embedding(indices, codebook).view(z.shape[0], *z.shape[2:], -1).movedim(-1, 1)
            loss = self.commitment_cost * F.mse_loss(z, quantized)
            if z.requires_grad:  # straight-through estimator; without autograd return the exact code vectors
                quantized = z + (quantized - z).detach()

            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            restarted = torch.zeros((), device=z.device, dtype=torch.long)
            if update:
                counts = self._update_ema(flat.detach(), indices, counts)
                restarted = self._restart_dead_codes(flat.detach())
        return QuantizerOutput(
            quantized=quantized,
            loss=loss,
            indices=indices.view(z.shape[0], *z.shape[2:]),
            stats=self._stats(counts, restarted),
        )

    @torch.no_grad()
    def _update_ema(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """EMA step on counts and sums (all-reduced across ranks); returns the global counts."""
        flat = flat.to(self.ema_sum.dtype)
        counts = counts.to(self.ema_sum.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
        if self.sync_ddp and _distributed():
            packed = torch.cat([counts[:, None], sums], dim=1)  # one collective instead of two
            dist.all_reduce(packed)
            counts, sums = packed[:, 0], packed[:, 1:]
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.embedding.copy_(self.ema_sum / smoothed[:, None])
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Re-initialise codes whose EMA count is below the threshold from random rows of ``flat``.

        The EMA buffers are identical on every rank, so every rank finds the same dead codes; the replacement
        vectors are drawn on rank 0 and broadcast.
        """
        if self.dead_code_threshold <= 0:
            return torch.zeros((), device=flat.device, dtype=torch.long)
        dead = torch.nonzero(self.ema_count < self.dead_code_threshold).squeeze(1)
        num_dead = dead.numel()
        if num_dead == 0:
            return torch.zeros((), device=flat.device, dtype=torch.long)
        if flat.shape[0] >= num_dead:
            rows = torch.randperm(flat.shape[0], device=flat.device)[:num_dead]
        else:
            rows = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
        new_codes = flat[rows].to(self.embedding.dtype).contiguous()
        if self.sync_ddp and _distributed():
            dist.broadcast(new_codes, src=0)
        self.embedding[dead] = new_codes
        # Restarted codes get a count equal to the threshold: one step of grace before they can be restarted again.
        self.ema_count[dead] = self.dead_code_threshold
        self.ema_sum[dead] = new_codes * self.dead_code_threshold
        return torch.tensor(num_dead, device=flat.device)

    @staticmethod
    def _stats(counts: torch.Tensor, restarted: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = counts / counts.sum().clamp_min(1.0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        return {
            "perplexity": entropy.exp().detach(),
            "usage": (counts > 0).float().mean().detach(),
            "restarted": restarted.detach(),
        }
