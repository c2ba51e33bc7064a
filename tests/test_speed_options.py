"""Speed and memory options (``stage.speed``): activation checkpointing, channels-last-3d, torch.compile.

Checkpointing must be exact (outputs and gradients) and invisible to checkpoints; channels-last must match
the default layout; compile (with the ``aot_eager`` backend: no C++ toolchain needed) must run through the
stages' real code paths; bad values must be ConfigErrors that name the key.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO_ROOT
from helpers import compose_cfg, tiny_checkpoints
from omegaconf import OmegaConf

from mrrl.diffusion.module import DiffusionModule
from mrrl.diffusion.unet import build_unet
from mrrl.errors import ConfigError
from mrrl.stages import diffusion as diffusion_stage
from mrrl.stages import ppo as ppo_stage
from mrrl.stages import vqgan as vqgan_stage
from mrrl.training import speed as speed_module
from mrrl.training.speed import (
    CompileOptions,
    SpeedOptions,
    checkpointed_blocks,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    is_compiled,
    maybe_compile,
    to_channels_last_3d,
)
from mrrl.vqgan.discriminators import SliceDiscriminator
from mrrl.vqgan.networks import VQGAN

CLASSES = ["HGG", "LGG"]
ALL_ON = [
    "stage.speed.channels_last=true",
    "stage.speed.gradient_checkpointing=true",
    "stage.speed.compile.enabled=true",
    "stage.speed.compile.backend=aot_eager",
]
TINY_UNET = [
    "stage.unet.channels=[8,16]",
    "stage.unet.attention_levels=[false,true]",
    "stage.unet.num_res_blocks=1",
    "stage.unet.num_head_channels=8",
    "stage.unet.norm_num_groups=8",
    "stage.optim.warmup_steps=0",
    "stage.val_sampling_steps=3",
    "stage.inference_steps=5",
    "stage.progress_bar=false",
]


def tiny_unet(dtype=torch.float64, seed: int = 0) -> torch.nn.Module:
    """A 2-level UNet with attention; MONAI's zero-initialised output conv randomised (so gradients flow)."""
    torch.manual_seed(seed)
    unet = build_unet(
        2,
        2,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
    ).to(dtype)
    with torch.no_grad():
        for param in unet.parameters():
            if param.abs().sum() == 0:
                param.normal_(std=0.05)
    return unet


def unet_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, 8, generator=gen, dtype=dtype)
    return x, torch.tensor([3, 700]), torch.tensor([0, 1])


def forward_backward(unet, x, t, y):
    unet.zero_grad(set_to_none=True)
    out = unet(x, timesteps=t, class_labels=y)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


def saved_bytes(fn) -> int:
    """Bytes the autograd graph keeps for backward outside checkpointed regions (what checkpointing saves)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


# ---------------------------------------------------------------------------------------------- checkpointing


def test_checkpointed_unet_gives_identical_outputs_and_gradients(monkeypatch) -> None:
    plain = tiny_unet()
    ckpt = copy.deepcopy(plain)
    names = enable_activation_checkpointing(ckpt)
    assert names[:4] == [
        "down_blocks.0.resnets.0",
        "down_blocks.0.downsampler",
        "down_blocks.1.attentions.0",
        "down_blocks.1.resnets.0",
    ]
    assert {"middle_block.resnet_1", "middle_block.attention", "up_blocks.0.upsampler"} <= set(names)
    calls = {"n": 0}
    real = speed_module.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        assert kwargs["use_reentrant"] is False
        return real(*args, **kwargs)

    monkeypatch.setattr(speed_module, "checkpoint", counting)
    x, t, y = unet_inputs()
    out_plain, grads_plain = forward_backward(plain.train(), x, t, y)
    out_ckpt, grads_ckpt = forward_backward(ckpt.train(), x, t, y)
    assert calls["n"] == len(names)
    assert torch.equal(out_plain, out_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=0, atol=1e-12, msg=name)
    # It does save memory: far fewer activations are kept for backward outside the checkpointed blocks.
    assert saved_bytes(lambda: ckpt(x, timesteps=t, class_labels=y)) < 0.5 * saved_bytes(
        lambda: plain(x, timesteps=t, class_labels=y)
    )
    # Off without gradients, and in eval mode unless require_training=False (the PPO policy's case).
    calls["n"] = 0
    with torch.no_grad():
        ckpt(x, timesteps=t, class_labels=y)
    ckpt.eval()(x, timesteps=t, class_labels=y)
    assert calls["n"] == 0
    enable_activation_checkpointing(ckpt, require_training=False)
    ckpt.eval()(x, timesteps=t, class_labels=y)
    assert calls["n"] == len(names)
    disable_activation_checkpointing(ckpt)
    assert checkpointed_blocks(ckpt) == []


def test_checkpointing_survives_deepcopy_and_pickle_bound_to_the_copy() -> None:
    unet = tiny_unet()
    enable_activation_checkpointing(unet)
    for clone in (copy.deepcopy(unet), pickle.loads(pickle.dumps(unet))):
        assert checkpointed_blocks(clone) == checkpointed_blocks(unet)
        for block in (
            clone.down_blocks[0].resnets[0],
            clone.middle_block.attention,
            clone.up_blocks[0].upsampler,
        ):
            assert block.forward.block is block  # rebound to the copy, not the original
        x, t, y = unet_inputs()
        assert torch.equal(
            forward_backward(clone.train(), x, t, y)[0], forward_backward(unet.train(), x, t, y)[0]
        )


def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways() -> None:
    plain = tiny_unet(torch.float32)
    fast = tiny_unet(torch.float32, seed=1)
    enable_activation_checkpointing(fast)
    to_channels_last_3d(fast)
    maybe_compile(fast, {"enabled": True, "backend": "eager"})
    assert is_compiled(fast)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    fast.load_state_dict(plain.state_dict())  # strict, into channels-last weights
    assert fast.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    other = tiny_unet(torch.float32, seed=2)
    other.load_state_dict(fast.state_dict())  # strict, out of them
    for name, value in plain.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name


def test_vqgan_checkpointing_is_exact_and_keeps_keys(monkeypatch) -> None:
    torch.manual_seed(0)
    kwargs = {"channels": (8, 16), "num_res_blocks": 1, "codebook_size": 16, "codebook_dim": 4}
    plain = VQGAN(**kwargs, dead_code_threshold=0.0)
    ckpt = VQGAN(**kwargs, dead_code_threshold=0.0, gradient_checkpointing=True)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    ckpt.load_state_dict(plain.state_dict())
    calls = {"n": 0}
    real = speed_module.checkpoint
    monkeypatch.setattr(
        speed_module, "checkpoint", lambda *a, **k: calls.__setitem__("n", calls["n"] + 1) or real(*a, **k)
    )
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    for model in (plain, ckpt):
        out = model(x)
        (torch.nn.functional.l1_loss(out.reconstruction, x) + out.vq_loss).backward()
    assert checkpointed_blocks(ckpt) == ["encoder", "decoder"] and calls["n"] == 2
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- channels-last


def test_channels_last_matches_the_default_layout() -> None:
    plain = tiny_unet(torch.float32).eval()
    fast = to_channels_last_3d(copy.deepcopy(plain))
    to_channels_last_3d(fast)  # idempotent: still one input hook
    assert len(fast._forward_pre_hooks) == 1
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last_3d)
        for m in fast.modules()
        if isinstance(m, torch.nn.Conv3d)
    )
    seen = {}
    fast.conv_in.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    x, t, y = unet_inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            fast(x, t, class_labels=y), plain(x, t, class_labels=y), rtol=1e-4, atol=1e-5
        )
    assert seen["x"].is_contiguous(memory_format=torch.channels_last_3d)

    torch.manual_seed(0)
    vqgan = VQGAN(channels=(8, 16), num_res_blocks=1, codebook_size=16, codebook_dim=4).eval()
    volumes = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = vqgan(volumes).reconstruction
        to_channels_last_3d(vqgan)
        torch.testing.assert_close(vqgan(volumes).reconstruction, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"compile": {"enabled": True, "backend": "no_such_backend"}}, "stage.speed.compile.backend"),
        ({"compile": {"enabled": True, "mode": "fastest"}}, "stage.speed.compile.mode"),
        ({"compile": {"mode": "max-autotune", "backend": "eager"}}, "stage.speed.compile.mode"),
        ({"compile": {"enabled": "yes"}}, "stage.speed.compile.enabled"),
        ({"compile": {"dynamic": "sometimes"}}, "stage.speed.compile.dynamic"),
        ({"channels_last": "on"}, "stage.speed.channels_last"),
        ({"gradient_checkpointing": 2}, "stage.speed.gradient_checkpointing"),
        ({"chanels_last": True}, "stage.speed"),
        ({"compile": {"enable": True}}, "stage.speed.compile"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(value, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SpeedOptions.from_config(value)


def test_defaults_are_off_and_non_3d_networks_are_refused() -> None:
    assert SpeedOptions.from_config(None) == SpeedOptions() and not SpeedOptions().any
    assert CompileOptions.from_config(True).kwargs() == {
        "mode": None,
        "backend": "inductor",
        "dynamic": False,
        "fullgraph": False,
    }
    module = torch.nn.Linear(2, 2)
    assert maybe_compile(module, {"enabled": False}) is False and not is_compiled(module)
    with pytest.raises(ConfigError, match=r"stage\.speed\.channels_last"):
        to_channels_last_3d(SliceDiscriminator(in_channels=1, channels=8, num_layers=2))
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        enable_activation_checkpointing(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3)))


def test_stages_check_speed_values_before_any_work(tmp_path: Path) -> None:
    bad = ["stage.speed.compile.enabled=true", "stage.speed.compile.backend=no_such_backend"]
    cfg = compose_cfg(["stage=vqgan", *bad], tmp_path)
    with pytest.raises(ConfigError, match=r"stage\.speed\.compile\.backend"):
        vqgan_stage.check_config(cfg, (1, 32, 32, 32))
    cfg = compose_cfg(["stage=diffusion", "stage.speed.channels_last=maybe"], tmp_path)
    with pytest.raises(ConfigError, match=r"stage\.speed\.channels_last"):
        diffusion_stage.check_config(cfg, (8, 8, 8, 8))
    cfg = compose_cfg(["stage=ppo", *bad], tmp_path)  # before any manifest or checkpoint is read
    with pytest.raises(ConfigError, match=r"stage\.speed\.compile\.backend"):
        ppo_stage.run(cfg, tmp_path / "ppo")
    # The VQGAN's older key still switches checkpointing on, through the speed block.
    cfg = compose_cfg(["stage=vqgan", "stage.net.gradient_checkpointing=true"], tmp_path)
    assert cfg.stage.speed.gradient_checkpointing is True


# ---------------------------------------------------------------------------------------------- stage code paths


def write_latent_cache(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    n = 8
    torch.save(
        {
            "latents": torch.randn(n, 2, 4, 4, 4, generator=gen),
            "labels": torch.arange(n) % 2,
            "ids": [f"s{i}" for i in range(n)],
            "splits": ["train"] * 6 + ["val"] * 2,
            "class_names": CLASSES,
        },
        path,
    )
    return path


def test_diffusion_module_trains_with_every_option_through_the_stage(tmp_path: Path) -> None:
    """Built as the stage builds it (channels-last, checkpointing, compile with aot_eager): one Lightning
    step; the same loss and gradients as without the options; its checkpoint loads into a plain module."""
    latents = write_latent_cache(tmp_path / "latents.pt")
    cfg = compose_cfg(["stage=diffusion", "data.batch_size=4", *TINY_UNET, *ALL_ON], tmp_path)
    datamodule = diffusion_stage.build_latent_datamodule(cfg, latents)
    datamodule.setup("fit")
    diffusion_stage.check_config(cfg, datamodule.latent_shape)
    torch.manual_seed(0)
    module = diffusion_stage.build_module(cfg, datamodule, None)
    assert checkpointed_blocks(module.denoiser.unet) and not checkpointed_blocks(module.ema.unet)
    assert is_compiled(module.denoiser.unet)
    assert module.ema.unet.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain = DiffusionModule(**{**dict(module.hparams), "speed": None})
    plain.load_state_dict(module.state_dict())
    assert list(plain.state_dict()) == list(module.state_dict())

    batch = datamodule.train_latents[:4], datamodule.datasets["train"].labels[:4]
    gen = torch.Generator().manual_seed(3)
    noise, steps = torch.randn(4, 2, 4, 4, 4, generator=gen), torch.tensor([5, 250, 500, 990])
    losses, grads = [], []
    for m in (plain, module):
        m.set_scale_factor(1.0)
        m.train().zero_grad(set_to_none=True)
        loss = m.diffusion_loss(*batch, noise=noise, timesteps=steps)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.denoiser.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-5, msg=name)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    before = {n: p.detach().clone() for n, p in module.denoiser.named_parameters()}
    module.scale_factor.zero_()  # fit start computes it from the cache
    trainer.fit(module, datamodule)
    assert trainer.global_step == 1 and is_compiled(module.denoiser.unet)
    assert any(not torch.equal(p, before[n]) for n, p in module.denoiser.named_parameters())
    path = tmp_path / "fast.ckpt"
    trainer.save_checkpoint(path)
    reloaded = DiffusionModule.load_from_checkpoint(path, map_location="cpu", speed=None)
    assert not checkpointed_blocks(reloaded.denoiser.unet) and not is_compiled(reloaded.denoiser.unet)
    for name, value in module.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_vqgan_module_trains_with_every_option_through_the_stage(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            "stage=vqgan",
            "stage.net.channels=[8,16]",
            "stage.net.num_res_blocks=1",
            "stage.net.codebook_size=16",
            "stage.net.codebook_dim=4",
            "stage.discriminator.channels=8",
            "stage.discriminator.num_layers=2",
            "stage.discriminator.slices_per_volume=2",
            "stage.loss.adv_start_step=0",
            *ALL_ON,
        ],
        tmp_path,
    )
    module = vqgan_stage.build_module(cfg, (1, 16, 16, 16))
    assert module.vqgan.config.gradient_checkpointing and checkpointed_blocks(module.vqgan)
    assert all(is_compiled(m) for m in (module.vqgan.encoder, module.vqgan.decoder, module.disc3d))
    assert module.disc3d.net[0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    volumes = [{"image": torch.rand(1, 16, 16, 16) * 2 - 1} for _ in range(2)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(volumes, batch_size=2))
    assert int(module.generator_steps) == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_ppo_policy_is_checkpointed_in_eval_mode_with_identical_gradients(
    tmp_path: Path, monkeypatch
) -> None:
    ckpts = tiny_checkpoints(tmp_path, CLASSES)
    stage = OmegaConf.load(REPO_ROOT / "conf" / "stage" / "ppo.yaml")
    stage.seed = 0
    cfg = OmegaConf.to_container(stage, resolve=True)
    cfg["sample"].update(num_steps=3, batch_size=4, decode_quantize=False)
    cfg["train"].update(min_step_std=0.0)
    cfg["probe"].update(every=0)
    speeds = [None, {"gradient_checkpointing": True}, {"channels_last": True, "gradient_checkpointing": True}]
    modules = [ppo_stage.PPOModule(ckpts["diffusion"], ckpts["vqgan"], CLASSES, cfg, speed=s) for s in speeds]
    for m in modules:
        m.reward_fn = lambda volumes: {"total": volumes.float().mean(dim=(1, 2, 3, 4))}
    assert checkpointed_blocks(modules[1].policy.unet) and not checkpointed_blocks(modules[1].reference.unet)
    assert modules[2].reference.unet.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    calls = {"n": 0}
    real = speed_module.checkpoint
    monkeypatch.setattr(
        speed_module, "checkpoint", lambda *a, **k: calls.__setitem__("n", calls["n"] + 1) or real(*a, **k)
    )
    buffer = modules[0].rollout()
    assert calls["n"] == 0  # no_grad rollout: plain forward
    idx, advantages = torch.arange(4), torch.linspace(-1, 1, 4)
    grads = []
    for m in modules:
        m.policy.zero_grad(set_to_none=True)
        loss, kl, _ = m._step_terms(buffer, idx, 1, advantages)
        assert float(kl.detach()) < 1e-12  # an unchanged policy: the reference shares its layout
        (loss + kl).backward()
        grads.append({n: p.grad for n, p in m.policy.named_parameters()})
        assert all(torch.isfinite(g).all() for g in grads[-1].values())
    # Every checkpointed layer ran through checkpoint, in eval mode, once per checkpointed module.
    assert (
        calls["n"] == 2 * len(checkpointed_blocks(modules[1].policy.unet)) and not modules[1].policy.training
    )
    for name, grad in grads[0].items():  # checkpointing is exact (channels-last only rounds differently)
        assert torch.equal(grads[1][name], grad), name
