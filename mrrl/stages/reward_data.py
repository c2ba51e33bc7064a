"""Stage 3, ``mrrl stage=reward_data``: the self-supervised reward dataset (paper §3.2–3.3).

Families of volumes, one group per (trajectory, steps, class):

* *synthetic*: denoise pure noise with S inference steps (few steps = poor quality);
* *reconstruction*: noise a real training volume's latent to the level of t inference steps (out of
  ``reconstruction_num_steps``) and denoise it back (t = 1 is almost the VQGAN reconstruction, t = 99 is
  almost a fresh sample) — the volumes that fill the gap between the diffusion model and the VQGAN limit;
* *fade* (optional, ``fade_levels``): VQGAN reconstructions of real training volumes faded towards the
  background, keeping L % of their contrast (0 = a blank volume). Neither family above contains a dark or
  empty volume, so reward models trained on them alone extrapolate there, and on the demo they score a blank
  volume above every sample of the diffusion model: a direction PPO finds within a few iterations
  (docs/rl.md). With these groups, the FID of such volumes labels them like every other group.

Each group's FID against the real training volumes of its class becomes the reward of all its volumes
(best group 1, worst 0, within a class by default). Finished groups are never regenerated: rerunning after
an interruption continues with the next group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mrrl.diffusion.generate import decode_latents, generate_volumes
from mrrl.diffusion.loading import load_diffusion_with_vqgan
from mrrl.diffusion.sampling import noised_reconstruction
from mrrl.errors import ConfigError
from mrrl.evaluation.real_sets import real_class_set, real_class_statistics
from mrrl.manifest import resolve_checkpoint, write_manifest
from mrrl.metrics.extractors import build_extractor
from mrrl.metrics.features import compute_statistics
from mrrl.metrics.statistics import FeatureStatistics
from mrrl.metrics.stats_cache import RealStatsCache
from mrrl.reward.dataset import RewardDatasetWriter, group_name
from mrrl.reward.maps import fid_to_reward
from mrrl.tracking.stage_logs import log_reward_data
from mrrl.tracking.wandb_run import stage_run
from mrrl.training.ranks import gather_share, generation_device, launch_ranks
from mrrl.training.runtime import build_datamodule
from mrrl.training.trainer import already_finished
from mrrl.utils.io import atomic_write_json, atomic_write_text
from mrrl.utils.markdown import fmt, fmt_fid, md_table

log = logging.getLogger(__name__)

DATASET_DIR = "dataset"
FID_FILE = "group_fids.json"


@dataclass(frozen=True)
class Group:
    trajectory: str  # "synthetic" | "reconstruction" | "fade"
    steps: int
    class_name: str
    label: int

    @property
    def name(self) -> str:
        return group_name(self.trajectory, self.steps, self.class_name)


def plan_groups(stage: Mapping[str, Any], class_names: Sequence[str]) -> list[Group]:
    """Every (trajectory, steps, class) group, cheapest first within a class."""
    num_steps = int(stage["reconstruction_num_steps"])
    bad = [t for t in stage["reconstruction_steps"] if not 0 < int(t) <= num_steps]
    if bad:
        raise ConfigError(
            f"stage.reconstruction_steps {bad} must be in 1..reconstruction_num_steps={num_steps}"
        )
    if any(int(s) < 1 for s in stage["synthetic_steps"]):
        raise ConfigError("stage.synthetic_steps must be positive")
    fade = [int(level) for level in stage["fade_levels"] or []]
    if any(not 0 <= level < 100 for level in fade):
        raise ConfigError(f"stage.fade_levels {fade}: each is the % of contrast kept, in 0..99")
    groups = []
    for label, name in enumerate(class_names):
        groups += [Group("synthetic", int(s), name, label) for s in sorted(stage["synthetic_steps"])]
        groups += [
            Group("reconstruction", int(t), name, label) for t in sorted(stage["reconstruction_steps"])
        ]
        groups += [Group("fade", level, name, label) for level in sorted(fade, reverse=True)]
    if len(groups) < 2 * len(class_names):
        raise ConfigError("the reward dataset needs at least two groups per class: give more steps")
    return groups


def resolve_checkpoints(cfg: DictConfig) -> tuple[str, str | None]:
    """(diffusion checkpoint, ``stage.vqgan_ckpt`` or None: the VQGAN the diffusion checkpoint records)."""
    experiment = cfg.paths.experiment_dir
    diffusion = resolve_checkpoint(cfg.stage.diffusion_ckpt, experiment, "diffusion", "stage.diffusion_ckpt")
    vqgan = cfg.stage.vqgan_ckpt
    return diffusion, resolve_checkpoint(vqgan, experiment, "vqgan", "stage.vqgan_ckpt") if vqgan else None


class GroupGenerator:
    """Makes the volumes of one group with the frozen diffusion model and VQGAN."""

    def __init__(
        self,
        loaded,
        vqgan,
        stage: Mapping[str, Any],
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        background: float = -1.0,
    ):
        self.loaded = loaded
        self.background = float(background)
        self.vqgan = vqgan
        self.stage = stage
        self.device = device
        self.batch_size = int(stage["sample_batch_size"])
        self.rank, self.world = rank, world

    def share(self, n: int) -> list[int]:
        """Indices of a group's volumes this rank makes (all of them in a single process)."""
        return list(range(self.rank, n, self.world))

    def _generator(self, group: Group, per_rank: bool = False) -> torch.Generator:
        # One stream per group (and rank, under DDP): a resumed run regenerates what an uninterrupted run would.
        tag = f":rank{self.rank}" if per_rank and self.world > 1 else ""
        digest = hashlib.sha256(f"{self.stage['seed']}:{group.name}{tag}".encode()).digest()
        seed = int.from_bytes(digest[:8], "little") % (2**63)
        return torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def synthetic(self, group: Group, n: int) -> tuple[torch.Tensor, list[str]]:
        """This rank's share of the group: ``len(self.share(n))`` volumes from pure noise."""
        n = len(self.share(n))
        labels = torch.full((n,), group.label, dtype=torch.long)
        volumes = generate_volumes(
            self.loaded.denoiser,
            self.vqgan,
            self.loaded.scale_factor,
            labels,
            self.loaded.latent_shape,
            num_steps=group.steps,
            sampler=self.stage["sampler"],
            eta=float(self.stage["eta"]),
            batch_size=self.batch_size,
            generator=self._generator(group, per_rank=True),
            guidance_scale=float(self.stage["guidance_scale"]),
        )
        return volumes, [""] * n

    def _sources(self, n_real: int, n: int, generator: torch.Generator) -> list[int]:
        """This rank's share of a group's source volumes: a shuffle of the class's real volumes, cycled to n
        (drawn identically on every rank)."""
        order = torch.randperm(n_real, generator=generator).tolist()
        return [order[i % len(order)] for i in self.share(n)]

    @torch.no_grad()
    def reconstruction(self, group: Group, real: torch.Tensor, real_ids: Sequence[str], n: int):
        """Noise the latents of real volumes (cycling through the class) t steps and denoise back.

        The sources of all ``n`` volumes are drawn the same way on every rank; this rank makes its share.
        """
        generator = self._generator(group)
        picks = self._sources(len(real), n, generator)
        if self.world > 1:
            generator = self._generator(group, per_rank=True)
        volumes = []
        for start in range(0, n, self.batch_size):
            chunk = picks[start : start + self.batch_size]
            x = real[chunk].to(self.device)
            z = self.vqgan.encode(x) * self.loaded.scale_factor
            labels = torch.full((len(chunk),), group.label, dtype=torch.long, device=self.device)
            out = noised_reconstruction(
                self.loaded.denoiser,
                z.to(self.loaded.denoiser.latent_dtype),
                labels,
                group.steps,
                int(self.stage["reconstruction_num_steps"]),
                sampler=self.stage["sampler"],
                eta=float(self.stage["eta"]),
                generator=generator,
                guidance_scale=float(self.stage["guidance_scale"]),
            )
            volumes.append(
                decode_latents(self.vqgan, out, self.loaded.scale_factor).float().clamp(-1, 1).cpu()
            )
        return torch.cat(volumes), [real_ids[i] for i in picks]

    @torch.no_grad()
    def fade(self, group: Group, real: torch.Tensor, real_ids: Sequence[str], n: int):
        """VQGAN reconstructions of real volumes (cycling through the class) keeping ``group.steps`` % of
        their contrast above the background: ``bg + L/100 · (x̂ − bg)``."""
        picks = self._sources(len(real), n, self._generator(group))
        recon = self.vqgan_limit(real[picks])
        keep = group.steps / 100.0
        return self.background + keep * (recon - self.background), [real_ids[i] for i in picks]

    @torch.no_grad()
    def vqgan_limit(self, real: torch.Tensor) -> torch.Tensor:
        out = [
            self.vqgan.reconstruct(real[i : i + self.batch_size].to(self.device)).float().clamp(-1, 1).cpu()
            for i in range(0, len(real), self.batch_size)
        ]
        return torch.cat(out)


def _load_fids(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fid_plot(
    groups: Sequence[Mapping[str, Any]], limits: Mapping[str, float], path: Path, extractor: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(g["class"] for g in groups))
    fig, axes = plt.subplots(1, len(classes), figsize=(4.5 * len(classes), 3.4), squeeze=False)
    for ax, name in zip(axes[0], classes):
        for trajectory, marker in (("synthetic", "o-"), ("reconstruction", "s-"), ("fade", "^-")):
            pts = sorted(
                (g["steps"], g["fid"]) for g in groups if g["class"] == name and g["trajectory"] == trajectory
            )
            if pts:
                ax.plot(*zip(*pts), marker, label=trajectory)
        if name in limits:
            ax.axhline(limits[name], color="k", ls="--", lw=1, label="VQGAN reconstruction limit")
        ax.set_title(name)
        ax.set_xlabel("denoising steps (fade: % of contrast kept)")
        ax.set_ylabel(f"FID ({extractor})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _summary_table(groups: Sequence[Mapping[str, Any]], limits: Mapping[str, float], extractor: str) -> str:
    header = ["group", "trajectory", "steps", "class", "volumes", "FID", "reward"]
    rows = [
        [g["group"], g["trajectory"], g["steps"], g["class"], g["count"], fmt_fid(g["fid"]), fmt(g["reward"])]
        for g in groups
    ]
    limit = ", ".join(f"{c} {fmt_fid(v)}" for c, v in limits.items())
    lines = [
        f"# Reward data: FID per group ({extractor})",
        "",
        *md_table(header, rows, align="l" * len(header)),
    ]
    return "\n".join([*lines, "", f"VQGAN reconstruction limit: {limit}", ""])


def compute_rewards(fids: Mapping[str, float], groups: Sequence[Group], method: str, tau, scope: str):
    """FID → reward, either over all groups at once or within each class (the default)."""
    if scope == "global":
        return fid_to_reward({g.name: fids[g.name] for g in groups}, method, tau)
    if scope != "class":
        raise ConfigError(f"stage.reward_scope must be 'class' or 'global', got {scope!r}")
    rewards: dict[str, float] = {}
    for name in dict.fromkeys(g.class_name for g in groups):
        members = [g for g in groups if g.class_name == name]
        rewards.update(fid_to_reward({g.name: fids[g.name] for g in members}, method, tau))
    return rewards


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    if already_finished(cfg, run_dir):
        return None
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    assert isinstance(stage, dict)
    datamodule = build_datamodule(cfg).prepare()
    groups = plan_groups(stage, datamodule.class_names)
    diffusion_ckpt, vqgan_ckpt = resolve_checkpoints(cfg)
    fabric = launch_ranks(cfg)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    device = generation_device(cfg, fabric)
    loaded, vqgan, vqgan_ckpt = load_diffusion_with_vqgan(
        diffusion_ckpt,
        vqgan_ckpt=vqgan_ckpt,
        fallback_vqgan=lambda: resolve_checkpoint(
            None, cfg.paths.experiment_dir, "vqgan", "stage.vqgan_ckpt"
        ),
        device=device,
    )
    if list(loaded.class_names) != datamodule.class_names:
        raise ConfigError(
            f"the diffusion model knows classes {loaded.class_names}, the data {datamodule.class_names}"
        )
    background = float(cfg.data.intensity_range[0])  # the preprocessed background value
    maker = GroupGenerator(loaded, vqgan, stage, device, rank, world, background)

    metrics = stage["metrics"]
    extractor = build_extractor(
        metrics["extractor"],
        in_channels=datamodule.image_shape[0],
        **dict((metrics.get("extractor_options") or {}).get(metrics["extractor"], {}) or {}),
    )
    extractor = extractor.to(device)
    batch = int(metrics["batch_size"])
    cache = RealStatsCache(Path(cfg.paths.cache_dir) / "fid_stats")
    n = int(stage["n_per_group"])
    # Every rank generates its share of each group; rank 0 alone scores the groups and writes the files.
    writer = None
    if rank == 0:
        writer = RewardDatasetWriter(
            run_dir / DATASET_DIR, datamodule.image_shape, capacity=n * len(groups), dtype=stage["dtype"]
        )
    fid_path = run_dir / FID_FILE
    fids = _load_fids(fid_path)
    real_split = stage["real_split"]
    real_cache: dict[str, tuple[torch.Tensor, list[str], FeatureStatistics]] = {}

    def real_for(name: str):
        if name not in real_cache:
            if rank == 0:
                real_cache[name] = real_class_statistics(
                    datamodule, real_split, name, extractor, cache, batch, device
                )
            else:  # only rank 0 scores: the others need the volumes (reconstruction sources), not statistics
                real_cache[name] = (*real_class_set(datamodule, real_split, name), None)
        return real_cache[name]

    start = time.monotonic()
    limits: dict[str, float] = dict(fids.get("_vqgan_limit", {}))
    bar = tqdm(groups, desc="reward groups", disable=not stage["progress_bar"] or rank != 0)
    for group in bar:
        bar.set_postfix_str(group.name)
        real, ids, real_stats = real_for(group.class_name)
        if rank == 0 and stage["include_limit"] and group.class_name not in limits:
            recon = maker.vqgan_limit(real)
            limits[group.class_name] = compute_statistics(extractor, recon, batch, device).frechet_distance(
                real_stats
            )
            fids["_vqgan_limit"] = limits
            atomic_write_json(fid_path, fids)
        if group.name in fids:  # the FID is written after the group's volumes: the group is complete
            continue
        t0 = time.monotonic()
        if group.trajectory == "synthetic":
            volumes, sources = maker.synthetic(group, n)
        elif group.trajectory == "fade":
            volumes, sources = maker.fade(group, real, ids, n)
        else:
            volumes, sources = maker.reconstruction(group, real, ids, n)
        volumes, sources = gather_share(fabric, volumes, sources, n)
        if rank != 0:
            continue
        fid = compute_statistics(extractor, volumes, batch, device).frechet_distance(real_stats)
        rows = [
            {
                "id": f"{group.name}-{i:04d}",
                "class": group.class_name,
                "label": group.label,
                "trajectory": group.trajectory,
                "steps": group.steps,
                "source_id": sources[i],
            }
            for i in range(n)
        ]
        if not writer.is_complete(group.name):
            writer.add_group(group.name, volumes.numpy(), rows)
        fids[group.name] = {"fid": float(fid), "seconds": round(time.monotonic() - t0, 3)}
        atomic_write_json(fid_path, fids)  # after the volumes: a group counts only once both are on disk
        log.info("%s: FID %.4g (%.1f s)", group.name, fid, time.monotonic() - t0)

    if fabric is not None:
        fabric.barrier()
        from mrrl.training.trainer import release_process_group

        release_process_group()
    if rank != 0:
        return None
    group_fids = {g.name: float(fids[g.name]["fid"]) for g in groups}
    rewards = compute_rewards(
        group_fids, groups, stage["reward_map"], stage.get("reward_tau"), stage["reward_scope"]
    )
    table = {g.name: {"fid": group_fids[g.name], "reward": rewards[g.name]} for g in groups}
    meta = {
        "class_names": datamodule.class_names,
        "extractor": extractor.identity,
        "reward_map": {
            "method": stage["reward_map"],
            "tau": stage.get("reward_tau"),
            "scope": stage["reward_scope"],
        },
        "vqgan_limit_fid": limits,
        "diffusion_ckpt": diffusion_ckpt,
        "vqgan_ckpt": vqgan_ckpt,
        "real_split": real_split,
    }
    writer.finalize(table, meta)
    summary = [
        {
            "group": g.name,
            "trajectory": g.trajectory,
            "steps": g.steps,
            "class": g.class_name,
            "count": n,
            "fid": group_fids[g.name],
            "reward": rewards[g.name],
            "seconds": fids[g.name].get("seconds"),
        }
        for g in groups
    ]
    atomic_write_text(run_dir / "summary.md", _summary_table(summary, limits, extractor.name))
    plot = _fid_plot(summary, limits, run_dir / "fid_vs_steps.png", extractor.name)
    outputs = {
        "dataset_dir": str((run_dir / DATASET_DIR).resolve()),
        "groups": summary,
        "vqgan_limit_fid": limits,
        "extractor": extractor.identity,
        "summary_md": str((run_dir / "summary.md").resolve()),
        "fid_plot": str(plot.resolve()),
        "num_volumes": n * len(groups),
        "seconds": round(time.monotonic() - start, 2),
        "diffusion_ckpt": diffusion_ckpt,
        "vqgan_ckpt": vqgan_ckpt,
    }
    with stage_run(cfg, run_dir) as wandb_logger:
        if wandb_logger is not None:
            log_reward_data(wandb_logger, summary, limits, plot, outputs["num_volumes"])
    write_manifest(run_dir, "reward_data", outputs, cfg)
    print((run_dir / "summary.md").read_text())
    return outputs
