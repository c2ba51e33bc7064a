"""The instrument's own checks: volumes whose FID ordering is known in advance.

* the **calibration ladder**: the real test volumes, encoded, noised ``t`` sampler steps forward and
  denoised back by the standard model (:func:`mrrl.diffusion.noised_reconstruction`). ``t = 0`` is the
  plain VQGAN reconstruction; larger ``t`` keeps less of the real volume, so FID must rise with ``t`` for
  an extractor to be trusted (Naeem et al. 2020: random-weight extractors are fine when validated);
* the **synthetic trajectory**: the standard model sampled from pure noise with several step counts.
  The paper's reward data rest on "more steps → lower FID"; this checks the premise on the test split
  with the headline extractor.

Volumes are cached like the Table 2 rows (``samples/<name>/<class>.npy`` + a JSON key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from mrrl.errors import ConfigError
from mrrl.evaluation.sources import ModelSpec, VolumeContext, cached_volumes, safe_name


@dataclass(frozen=True)
class CalibrationSettings:
    ladder_steps: tuple[int, ...]
    ladder_num_steps: int
    synthetic_steps: tuple[int, ...]
    synthetic_n_per_class: int | None  # None: as many as the real reference has
    sampler: str
    eta: float
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, stage: DictConfig) -> CalibrationSettings:
        cal = stage.calibration
        ladder = tuple(sorted(int(t) for t in cal.ladder_steps))
        num_steps = int(cal.ladder_num_steps)
        if any(not 0 <= t <= num_steps for t in ladder):
            raise ConfigError(
                f"stage.calibration.ladder_steps {list(ladder)} must lie in 0..ladder_num_steps={num_steps}"
            )
        synthetic = tuple(sorted(int(s) for s in cal.synthetic_steps))
        if any(s < 1 for s in synthetic):
            raise ConfigError(f"stage.calibration.synthetic_steps {list(synthetic)} must be >= 1")
        n = cal.synthetic_n_per_class
        return cls(
            ladder_steps=ladder,
            ladder_num_steps=num_steps,
            synthetic_steps=synthetic,
            synthetic_n_per_class=None if n is None else int(n),
            sampler=str(cal.sampler),
            eta=float(cal.eta),
            batch_size=int(stage.sample_batch_size),
            seed=int(stage.seed),
        )

    def key(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "eta": self.eta, "seed": self.seed, "batch": self.batch_size}


def ladder_name(t: int) -> str:
    return f"ladder_t{t:03d}"


def synthetic_name(steps: int) -> str:
    return f"synthetic_s{steps:03d}"


class _Models:
    """The standard diffusion model and its VQGAN, loaded on first use."""

    def __init__(self, spec: ModelSpec, ctx: VolumeContext):
        self.spec, self.ctx, self._loaded = spec, ctx, None

    def get(self):
        if self._loaded is None:
            from mrrl.diffusion.loading import load_diffusion_with_vqgan

            loaded, vqgan, _ = load_diffusion_with_vqgan(
                self.spec.source,
                fallback_vqgan=self.ctx.vqgan_ckpt,
                use_ema=self.ctx.settings.use_ema,
                device=self.ctx.device,
            )
            self._loaded = (loaded, vqgan)
        return self._loaded

    @property
    def quantize(self) -> bool:
        """Snap to the codebook before decoding as the Table 2 rows do (None: the checkpoint's setting)."""
        if self.ctx.settings.decode_quantize is not None:
            return bool(self.ctx.settings.decode_quantize)
        return bool((self.get()[0].hparams.get("sampling") or {}).get("decode_quantize", True))


@torch.no_grad()
def _ladder_class(models: _Models, real: torch.Tensor, label: int, t: int, cal: CalibrationSettings, ctx):
    from mrrl.diffusion.generate import decode_latents
    from mrrl.diffusion.sampling import noised_reconstruction

    loaded, vqgan = models.get()
    gen = torch.Generator().manual_seed(cal.seed * 1_000_003 + 7 * label + 1)
    out = []
    for batch in real.split(cal.batch_size):
        z = vqgan.encode(batch.to(ctx.device)) * loaded.scale_factor
        labels = torch.full((len(batch),), label, dtype=torch.long)
        noise = torch.randn(z.shape, generator=gen).to(z.device, loaded.denoiser.latent_dtype)
        latents = noised_reconstruction(
            loaded.denoiser,
            z.to(loaded.denoiser.latent_dtype),
            labels,
            t,
            cal.ladder_num_steps,
            sampler=cal.sampler,
            eta=cal.eta,
            generator=gen,
            noise=noise,
        )
        volumes = decode_latents(vqgan, latents, loaded.scale_factor, models.quantize)
        out.append(volumes.float().clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def _synthetic_class(models: _Models, label: int, n: int, steps: int, cal: CalibrationSettings, ctx):
    from mrrl.diffusion.generate import generate_volumes

    loaded, vqgan = models.get()
    gen = torch.Generator().manual_seed(cal.seed * 1_000_003 + label)  # the same noise at every step count
    return generate_volumes(
        loaded.denoiser,
        vqgan,
        loaded.scale_factor,
        torch.full((n,), label, dtype=torch.long),
        loaded.latent_shape,
        num_steps=steps,
        sampler=cal.sampler,
        eta=cal.eta,
        batch_size=cal.batch_size,
        generator=gen,
        quantize=models.quantize,
    )


def calibration_volumes(
    standard: ModelSpec, ctx: VolumeContext, cal: CalibrationSettings
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """``({name: {class: volumes}}, {name: {"kind", "t" | "steps"}})`` for the ladder and the trajectory."""
    models = _Models(standard, ctx)
    volumes: dict[str, dict[str, torch.Tensor]] = {}
    info: dict[str, dict[str, Any]] = {}
    base = {"model": standard.identity(), **cal.key(), "quantize": ctx.settings.decode_quantize}
    for t in cal.ladder_steps:
        name = ladder_name(t)
        volumes[name], info[name] = {}, {"kind": "ladder", "t": t, "num_steps": cal.ladder_num_steps}
        for index, c in enumerate(ctx.class_names):
            key = {
                **base,
                "ladder_t": t,
                "num_steps": cal.ladder_num_steps,
                "subjects": list(ctx.real_ids[c]),
            }
            path = ctx.samples_dir / name / f"{safe_name(c)}.npy"
            volumes[name][c], _ = cached_volumes(
                path,
                key,
                lambda c=c, index=index, t=t: _ladder_class(models, ctx.real[c], index, t, cal, ctx),
                ctx.regenerate,
            )
    for steps in cal.synthetic_steps:
        name = synthetic_name(steps)
        volumes[name], info[name] = {}, {"kind": "synthetic", "steps": steps}
        for index, c in enumerate(ctx.class_names):
            n = cal.synthetic_n_per_class or len(ctx.real[c])
            key = {**base, "synthetic_steps": steps, "n": n, "class_index": index}
            path = ctx.samples_dir / name / f"{safe_name(c)}.npy"
            volumes[name][c], _ = cached_volumes(
                path,
                key,
                lambda index=index, n=n, steps=steps: _synthetic_class(models, index, n, steps, cal, ctx),
                ctx.regenerate,
            )
    return volumes, info


def trend(values: Sequence[Mapping[str, float]], rising: bool) -> dict[str, Any]:
    """Is a sequence of estimates (``value``, ``low``, ``high``) monotone in the expected direction?

    ``monotone``: every point estimate moves the expected way (ties allowed); ``no_reversal``: no step goes
    the wrong way by more than the intervals allow (the later interval entirely on the wrong side of the
    earlier one); ``end_to_end``: the last value's interval lies entirely on the right side of the first's.
    ``passed`` = no reversal and the last point beyond the first.
    """
    sign = 1.0 if rising else -1.0
    pts = [sign * v["value"] for v in values]
    monotone = all(b >= a for a, b in zip(pts, pts[1:]))

    def lo(v):
        return v["low"] if rising else -v["high"]

    def hi(v):
        return v["high"] if rising else -v["low"]

    no_reversal = all(hi(b) >= lo(a) for a, b in zip(values, values[1:]))
    end_to_end = len(values) > 1 and lo(values[-1]) > hi(values[0])
    passed = len(values) > 1 and no_reversal and pts[-1] > pts[0]
    return {"monotone": monotone, "no_reversal": no_reversal, "end_to_end": end_to_end, "passed": passed}


def premise_checks(
    results_for_headline: Mapping[str, Any], info: Mapping[str, Mapping[str, Any]], floor, col: str
):
    """The paper's three premises on the headline extractor, each with its numbers and a pass/fail mark."""
    scores = results_for_headline["scores"]["fid"]
    checks = []
    trends = (
        ("ladder", "t", "reconstruction FID rises with t", True),
        ("synthetic", "steps", "synthetic FID falls with sampler steps", False),
    )
    for kind, xkey, premise, rising in trends:
        points = sorted((i[xkey], n) for n, i in info.items() if i["kind"] == kind)
        if points:
            seq = [scores[n][col] for _, n in points]
            checks.append({"premise": premise, "x": [x for x, _ in points], "fid": seq, **trend(seq, rising)})
    gap = (results_for_headline.get("gap") or {}).get("fid", {}).get(col)
    if gap is not None:
        ceiling = floor["fid"][col]["high"]
        checks.append(
            {
                "premise": "limit→standard gap above the noise floor",
                "gap": gap,
                "floor_high": ceiling,
                "passed": bool(math.isfinite(ceiling) and gap["low"] > ceiling),
            }
        )
    return checks
