"""The PPO LightningModule (paper §3.5): rollouts with the current policy, the learned reward, and clipped-surrogate
updates with a KL penalty to the frozen pretrained policy."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mrrl.diffusion.generate import (
    EMA_PREFIX,
    RAW_PREFIX,
    SCALE_KEY,
    decode_latents,
)
from mrrl.diffusion.loading import load_diffusion_with_vqgan
from mrrl.diffusion.sampling import sample, step_log_prob
from mrrl.errors import ConfigError
from mrrl.ppo.advantages import PerClassRewardNormalizer
from mrrl.ppo.kl import KLController
from mrrl.ppo.multiscale_reward import MultiScaleReward
from mrrl.ppo.selection import BestTracker
from mrrl.ppo.settings import PPOSettings, SampleSettings
from mrrl.ppo.surrogate import clipped_surrogate, ppo_step_stats
from mrrl.reward.ensemble import RewardEnsemble
from mrrl.settings import from_config
from mrrl.tracking.keys import PPO_ITERATION
from mrrl.tracking.wandb_run import step_axes
from mrrl.training.speed import (
    SpeedOptions,
    enable_activation_checkpointing,
    maybe_compile,
    to_channels_last_3d,
)
from mrrl.utils.checkpoints import safe_load
from mrrl.utils.io import atomic_path
from mrrl.utils.viz import log_figure, slices_figure

log = logging.getLogger(__name__)


RewardFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


BUFFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _IterationDataset(torch.utils.data.Dataset):
    """One item per epoch: Lightning's epoch = one PPO iteration (clean resume boundaries)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        return index


class PPOModule(L.LightningModule):
    """``ppo``: the typed settings (or their ``dataclasses.asdict``, as stored in the checkpoint's hparams);
    ``speed``: the ``stage.speed`` block (None: all off)."""

    def __init__(
        self,
        diffusion_ckpt: str,
        vqgan_ckpt: str | None,
        class_names: Sequence[str],
        ppo: PPOSettings | Mapping[str, Any],
        reward_ckpts: Mapping[str, str | Sequence[str] | None] | None = None,
        speed: SpeedOptions | Mapping[str, Any] | None = None,
        fallback_vqgan: str | None = None,
    ):
        super().__init__()
        self.settings = ppo if isinstance(ppo, PPOSettings) else from_config(PPOSettings, ppo, "stage")
        self.speed = SpeedOptions.from_config(speed)
        # The diffusion checkpoint and its VQGAN, each read once (vqgan_ckpt None: the one it records, else
        # fallback_vqgan, e.g. the experiment's vqgan manifest).
        loaded, vqgan, vqgan_ckpt = load_diffusion_with_vqgan(
            diffusion_ckpt, vqgan_ckpt=vqgan_ckpt, fallback_vqgan=fallback_vqgan, use_ema=True
        )
        # Plain values in the hparams: load_from_checkpoint rebuilds the settings from them (weights_only).
        self.save_hyperparameters(
            {
                "diffusion_ckpt": diffusion_ckpt,
                "vqgan_ckpt": vqgan_ckpt,
                "fallback_vqgan": fallback_vqgan,
                "class_names": list(class_names),
                "ppo": dataclasses.asdict(self.settings),
                "reward_ckpts": None if reward_ckpts is None else dict(reward_ckpts),
                "speed": self.speed.to_dict(),
            }
        )
        self.automatic_optimization = False
        s = self.settings
        self.policy = loaded.denoiser.requires_grad_(True)
        self.scale_factor = loaded.scale_factor
        self.latent_shape = tuple(loaded.latent_shape)
        self.class_names = list(class_names)
        if list(loaded.class_names) != self.class_names:
            raise ConfigError(
                f"diffusion classes {loaded.class_names} differ from the data's {self.class_names}"
            )
        self._select_trainable(s.train.trainable)
        # Frozen helpers live outside the module tree: never trained, never in the DDP bucket or checkpoints.
        # The reference keeps requires_grad=True like the policy (it is only ever called under no_grad and is
        # in no optimiser): CPU kernels differ with the flag, and an unchanged policy must give KL = 0 exactly.
        self._frozen: dict[str, Any] = {
            "reference": copy.deepcopy(loaded.denoiser).eval(),
            "vqgan": vqgan,
        }
        if self.speed.channels_last:  # policy and reference alike: an unchanged policy keeps KL = 0
            to_channels_last_3d(self.policy.unet)
            to_channels_last_3d(self.reference.unet)
        if self.speed.gradient_checkpointing:
            # The policy is trained in eval mode (no dropout): checkpoint whenever gradients are recorded,
            # i.e. in the update; the rollout and the reference run under no_grad and are not affected.
            enable_activation_checkpointing(self.policy.unet, require_training=False)
        self._compile()
        self.reward_fn: RewardFn | None = None
        if reward_ckpts is not None:
            from mrrl.reward.models import load_reward_model

            models = {
                k: RewardEnsemble([load_reward_model(p) for p in ([v] if isinstance(v, str) else v)])
                if v
                else None
                for k, v in reward_ckpts.items()
            }
            self.reward_fn = MultiScaleReward(
                models.get("r3d"),
                models.get("r2d"),
                s.reward.w3d,
                s.reward.w2d,
                float(s.reward.uncertainty_penalty),
            )
        self.normalizer = PerClassRewardNormalizer(
            len(self.class_names),
            int(s.reward.stat_buffer),
            int(s.reward.stat_min_count),
            float(s.reward.adv_clip),
        )
        self.kl = KLController.from_settings(s.train.kl)
        self.best = BestTracker(f"{s.probe.select}/mean")
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))
        self.fid_probe: Callable[[PPOModule], dict[str, float]] | None = None
        # Where the best-on-validation policy goes (``run`` sets it; None: not saved, only tracked).
        self.best_path: Path | None = None

    # ------------------------------------------------------------------------------------------ setup
    def _select_trainable(self, trainable: str | Sequence[str]) -> None:
        """``all`` or regexes over UNet parameter names (partial fine-tuning saves optimiser memory)."""
        if trainable == "all":
            return
        patterns = [re.compile(p) for p in ([trainable] if isinstance(trainable, str) else trainable)]
        matched = 0
        for name, param in self.policy.unet.named_parameters():
            param.requires_grad_(any(p.search(name) for p in patterns))
            matched += int(param.requires_grad)
        if not matched:
            raise ConfigError(f"stage.train.trainable={trainable} matches no UNet parameter")

    def _compile(self) -> None:
        """``stage.speed.compile``: the policy's and the reference's UNets, in place (state_dict keys unchanged).
        Called again in ``setup``, since a spawned DDP process receives uncompiled copies."""
        maybe_compile(self.policy.unet, self.speed.compile)
        maybe_compile(self.reference.unet, self.speed.compile)

    def setup(self, stage: str) -> None:
        self._compile()

    @property
    def reference(self):
        return self._frozen["reference"]

    @property
    def vqgan(self):
        return self._frozen["vqgan"]

    def on_fit_start(self) -> None:
        self.reference.to(self.device)
        self.vqgan.to(self.device)
        if self.reward_fn is not None and hasattr(self.reward_fn, "to"):
            self.reward_fn.to(self.device)
        self.policy.eval()  # no dropout anywhere: recomputed log-probs must match the rollout's exactly

    def train(self, mode: bool = True) -> PPOModule:
        super().train(mode)
        self.policy.eval()
        return self

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        train = self.settings.train
        return torch.optim.AdamW(
            params,
            lr=float(train.lr),
            betas=tuple(float(b) for b in train.betas),
            weight_decay=float(train.weight_decay),
            eps=1e-8,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_IterationDataset(), batch_size=1)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _rank_generator(self) -> torch.Generator:
        """Different noise on every rank and iteration, reproducible from the seed."""
        rank = self.global_rank if self._trainer is not None else 0
        seed = int(self.settings.seed) * 1_000_003 + int(self.iterations) * 1009 + rank
        return torch.Generator(device="cpu").manual_seed(seed)

    def _balanced_labels(self, n: int) -> torch.Tensor:
        rank = self.global_rank if self._trainer is not None else 0
        return (torch.arange(n) + rank * n) % len(self.class_names)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            return self.all_gather(tensor).reshape(-1, *tensor.shape[1:])
        return tensor

    def _no_sync(self):
        model = self.trainer.model if self._trainer is not None else None
        return (
            model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext()
        )

    def _average_gradients(self) -> None:
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            for param in self.policy.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                    param.grad /= self.world_size

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self) -> dict[str, Any]:
        cfg = self.settings.sample
        n = int(cfg.batch_size)
        labels = self._balanced_labels(n).to(self.device)
        store = BUFFER_DTYPES[cfg.buffer_dtype]
        # The chain is rounded to the buffer dtype as it is sampled: the old log-probs are computed on exactly
        # the latents the buffer keeps, so an unchanged policy recomputes them bit for bit (ratio = 1).
        latents, trajectory = sample(
            self.policy,
            labels,
            int(cfg.num_steps),
            sampler=cfg.sampler,
            eta=float(cfg.eta),
            generator=self._rank_generator(),
            shape=self.latent_shape,
            return_trajectory=True,
            round_to=None if store == torch.float32 else store,
        )
        if not bool(trajectory.stochastic.all()):
            raise ConfigError(
                "some sampler steps are deterministic (σ=0) and have no log-probability: use eta > 0 with a "
                "diffusion schedule trained with steps_offset=1, set_alpha_to_one=false"
            )
        volumes = (
            decode_latents(self.vqgan, latents, self.scale_factor, quantize=bool(cfg.decode_quantize))
            .float()
            .clamp(-1, 1)
        )
        assert self.reward_fn is not None, "PPOModule needs a reward function"
        rewards = {k: v.detach() for k, v in self.reward_fn(volumes).items()}
        return {
            "labels": labels.cpu(),
            "latents": torch.stack([x.to("cpu", store) for x in trajectory.latents], dim=1),  # [B, K+1, ...]
            "timesteps": trajectory.timesteps.cpu(),
            "prev_timesteps": trajectory.prev_timesteps.cpu(),
            "log_probs": trajectory.log_probs.float().cpu(),  # [B, K]
            "stds": trajectory.stds.flatten()[: trajectory.num_steps]
            .float()
            .cpu(),  # [K], shared by the batch
            "rewards": rewards,
            "volumes": volumes[: int(self.settings.figures.volumes)].cpu(),
        }

    # ------------------------------------------------------------------------------------------ update
    def _step_terms(self, buffer, idx: torch.Tensor, j: int, advantages: torch.Tensor):
        x_t = buffer["latents"][idx, j].to(self.device, torch.float32)
        x_prev = buffer["latents"][idx, j + 1].to(self.device, torch.float32)
        labels = buffer["labels"][idx].to(self.device)
        t, prev_t = buffer["timesteps"][j], buffer["prev_timesteps"][j]
        sample_cfg, clip_range = self.settings.sample, float(self.settings.train.clip_range)
        kwargs = {"prev_t": prev_t, "sampler": sample_cfg.sampler, "eta": float(sample_cfg.eta)}
        new = step_log_prob(self.policy, x_t, x_prev, t, labels, **kwargs)
        old = buffer["log_probs"][idx, j].to(self.device)
        loss = clipped_surrogate(new.log_prob, old, advantages, clip_range)
        with torch.no_grad():
            ref = step_log_prob(self.reference, x_t, x_prev, t, labels, **kwargs)
        kl = gaussian_kl_mean(new.mean, ref.mean, new.std)
        return loss, kl, ppo_step_stats(new.log_prob.detach(), old, clip_range)

    def update(self, buffer: Mapping[str, Any], advantages: torch.Tensor) -> dict[str, float]:
        optimizer = self.optimizers()
        train = self.settings.train
        n, k = buffer["log_probs"].shape
        mb = min(int(train.batch_size), n)
        # Steps whose σ_t is below min_step_std are not trained: their noise barely changes x̂0 (no credit to
        # assign) while their log-prob gradients scale like 1/σ_t and would drown the informative steps.
        trainable = torch.nonzero(buffer["stds"] >= float(train.min_step_std)).flatten()
        if trainable.numel() == 0:
            raise ConfigError("stage.train.min_step_std excludes every sampler step")
        n_train = max(1, int(round(trainable.numel() * float(train.timestep_fraction))))
        beta = self.kl.coef
        totals = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0}
        count = 0
        generator = self._rank_generator()
        for _ in range(int(train.inner_epochs)):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, mb):
                idx = order[start : start + mb]
                steps = trainable[torch.randperm(trainable.numel(), generator=generator)[:n_train]].tolist()
                optimizer.zero_grad(set_to_none=True)
                with self._no_sync():
                    for j in steps:
                        policy_loss, kl, stats = self._step_terms(
                            buffer, idx, j, advantages[idx].to(self.device)
                        )
                        loss = (policy_loss + beta * kl) / len(steps)
                        # One timestep's graph at a time: memory does not grow with K.
                        self.manual_backward(loss)
                        totals["loss"] += float(loss.detach()) * len(steps)
                        totals["policy_loss"] += float(policy_loss.detach())
                        totals["kl"] += float(kl.detach())
                        totals["approx_kl"] += float(stats["approx_kl"])
                        totals["clip_fraction"] += float(stats["clip_fraction"])
                        count += 1
                self._average_gradients()
                if self._finite_gradients():
                    clip = train.grad_clip
                    if clip:
                        self.clip_gradients(
                            optimizer, gradient_clip_val=float(clip), gradient_clip_algorithm="norm"
                        )
                    optimizer.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    self.skipped_updates += 1
                    log.warning("skipped a PPO update with non-finite gradients")
        return {key: value / max(count, 1) for key, value in totals.items()}

    def _finite_gradients(self) -> bool:
        flags = [torch.isfinite(p.grad).all() for p in self.policy.parameters() if p.grad is not None]
        ok = torch.stack(flags).all() if flags else torch.tensor(True)
        if self.world_size > 1 and dist.is_initialized():
            ok = ok.to(self.device).float()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    # ------------------------------------------------------------------------------------------ loop
    def training_step(self, batch: Any, batch_idx: int) -> None:
        if int(self.iterations) == 0 and not self.best.history:
            self._probe(log_now=True)  # iteration 0: the pretrained policy, the baseline of every later probe
        buffer = self.rollout()
        rewards = buffer["rewards"]["total"]
        labels = buffer["labels"].to(rewards.device)
        all_rewards, all_labels = self._gather(rewards), self._gather(labels)
        advantages = self.normalizer.normalize(
            rewards.cpu(), labels.cpu(), all_rewards.cpu(), all_labels.cpu()
        )
        beta = self.kl.coef
        stats = self.update(buffer, advantages)
        self.kl.update(self._mean_over_ranks(stats["kl"]))  # every rank adapts β on the same value
        self.iterations += 1
        logs = {f"ppo/{k}": v for k, v in stats.items()}
        logs["ppo/kl_coef"] = beta  # the β this iteration's update used
        logs["ppo/reward_mean"] = float(all_rewards.mean())
        logs["ppo/reward_std"] = float(all_rewards.std(unbiased=False)) if all_rewards.numel() > 1 else 0.0
        for name, values in buffer["rewards"].items():
            gathered = self._gather(values)
            for label, class_name in enumerate(self.class_names):
                mask = all_labels == label
                if mask.any():
                    logs[f"reward/{name}_{class_name}"] = float(gathered[mask].mean())
        logs["ppo/skipped_updates"] = float(self.skipped_updates)
        logs["ppo/iteration"] = float(self.iterations)
        self.log_dict(logs, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
        every = int(self.settings.probe.every or 0)
        if every and int(self.iterations) % every == 0:
            self._probe(log_now=False)
        if self.trainer.is_global_zero and int(self.iterations) % int(self.settings.figures.every) == 0:
            figure = slices_figure(
                {"sample": list(buffer["volumes"])}, title=f"PPO iteration {int(self.iterations)}"
            )
            log_figure(
                figure,
                "ppo/samples",
                int(self.iterations),
                self.trainer.default_root_dir,
                self.loggers,
                axes={**step_axes(self.trainer), PPO_ITERATION: float(self.iterations)},
            )

    def _mean_over_ranks(self, value: float) -> float:
        if self.world_size > 1:
            return float(self.all_gather(torch.tensor(float(value), device=self.device)).mean())
        return float(value)

    def _probe(self, log_now: bool) -> None:
        """Run the validation probe (rank 0), log it, and keep ``ppo_best.ckpt`` when it is the best so far.

        ``log_now``: write straight to the loggers (iteration 0, before any update: a row of its own)
        instead of into this training step's row.
        """
        if self.fid_probe is None or not self.trainer.is_global_zero:
            return
        metrics = dict(self.fid_probe(self))
        iteration = int(self.iterations)
        if self.best.update(iteration, metrics[self.best.metric]) and self.best_path is not None:
            save_policy_as_diffusion_checkpoint(self, self.hparams.diffusion_ckpt, self.best_path)
        metrics["probe/best_iteration"] = float(
            self.best.best_iteration if self.best.best_iteration is not None else -1
        )
        if log_now:
            for logger in self.loggers:
                logger.log_metrics({**metrics, "ppo/iteration": float(iteration)}, step=self.global_step)
        else:
            self.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reward_normalizer"] = self.normalizer.state_dict()
        checkpoint["kl_controller"] = self.kl.state_dict()
        checkpoint["probe_best"] = self.best.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "reward_normalizer" in checkpoint:
            self.normalizer.load_state_dict(checkpoint["reward_normalizer"])
        if "kl_controller" in checkpoint:
            self.kl.load_state_dict(checkpoint["kl_controller"])
        if "probe_best" in checkpoint:
            self.best.load_state_dict(checkpoint["probe_best"])


def gaussian_kl_mean(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Closed-form per-step KL ``‖μθ − μref‖² / (2σ_t²)``, averaged over dimensions (as the log-prob) and batch."""
    from mrrl.diffusion.sampling import gaussian_kl

    return gaussian_kl(mean_a, mean_b, std, reduce="mean").mean()


def save_policy_as_diffusion_checkpoint(
    module: PPOModule, base_ckpt: str | Path, out_path: str | Path
) -> Path:
    """The fine-tuned UNet in the diffusion stage's checkpoint format (``load_diffusion`` reads it).

    The base checkpoint is read once per process and kept beside the frozen helpers: ``ppo_best.ckpt`` is
    rewritten whenever the probe improves."""
    cached = module._frozen.get("base_checkpoint")
    if cached is None or cached[0] != str(base_ckpt):
        cached = module._frozen["base_checkpoint"] = (str(base_ckpt), safe_load(base_ckpt))
    base = cached[1]
    weights = {k: v.detach().cpu() for k, v in module.policy.unet.state_dict().items()}
    state = {k: v for k, v in base["state_dict"].items() if not k.startswith((EMA_PREFIX, RAW_PREFIX))}
    state.update({EMA_PREFIX + k: v for k, v in weights.items()})
    state.update({RAW_PREFIX + k: v for k, v in weights.items()})
    state[SCALE_KEY] = base["state_dict"][SCALE_KEY]
    base_hparams = dict(base["hyper_parameters"])
    payload = {
        "state_dict": state,
        "hyper_parameters": {
            **base_hparams,
            # The policy was trained on the rollout sampler: later stages sample it that way by default
            # (their sampler keys null = the checkpoint's); the base model's own settings are kept beside.
            "sampling": rollout_sampling(module.settings.sample),
            "base_sampling": base_hparams.get("sampling"),
            "fine_tuned_by": "ppo",
            "ppo_iterations": int(module.iterations),
            "base_ckpt": str(base_ckpt),
        },
        "global_step": base.get("global_step"),
    }
    with atomic_path(out_path) as tmp:
        torch.save(payload, tmp)
    return Path(out_path)


def rollout_sampling(sample: SampleSettings) -> dict[str, Any]:
    """The sampler the policy was optimised on, in the diffusion checkpoint's ``sampling`` format."""
    return {
        "sampler": str(sample.sampler),
        "num_steps": int(sample.num_steps),
        "eta": float(sample.eta),
        "guidance_scale": 1.0,  # rollouts are unguided
        "batch_size": int(sample.batch_size),
        "decode_quantize": bool(sample.decode_quantize),
    }
