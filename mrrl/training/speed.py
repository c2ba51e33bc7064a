"""Speed and memory options for the 3D networks: channels-last-3d, activation checkpointing, ``torch.compile``.

Every option is off by default and none of them changes a parameter's or buffer's name, so checkpoints
written with and without them load into each other. The stages read them from a ``stage.speed`` block::

    speed:
      channels_last: false           # NDHWC (channels_last_3d) weights and inputs for every 3D convolution
      gradient_checkpointing: false  # recompute block activations in the backward pass (less memory)
      compile:
        enabled: false               # torch.compile the trained network(s) in place (Module.compile)
        mode: default                # inductor mode: default | reduce-overhead | max-autotune | ...
        backend: inductor            # any torch._dynamo backend: inductor | aot_eager | eager | ...
        dynamic: false               # false: one static graph per input shape; null: PyTorch decides
        fullgraph: false             # true: fail on graph breaks instead of falling back to Python

The helpers:

* :func:`to_channels_last_3d` stores the weights of every ``Conv3d``/``ConvTranspose3d`` in a module as
  ``torch.channels_last_3d`` and (by default) registers a forward pre-hook that converts the module's 5-D
  floating-point inputs too. cuDNN runs 3D convolutions (bf16/fp16 especially) without layout transposes
  in that format; on the CPU it usually costs time. Numerics match the default layout up to the kernels'
  rounding.
* :func:`enable_activation_checkpointing` makes chosen sub-modules (by default the resnets, attention
  blocks and resamplers of MONAI's ``DiffusionModelUNet``) run their forward through
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` whenever gradients are being recorded,
  so only the blocks' inputs stay alive until the backward pass, which recomputes each block once
  (roughly one extra forward: +30-40 % step time; -40 to -55 % activation memory in the benchmarks). Outputs and gradients are identical (the RNG state is
  restored for the recomputation). It replaces the blocks' ``forward`` on the instance and registers no
  module, so ``state_dict``, ``named_parameters`` and parameter order are unchanged.
* :func:`maybe_compile` calls ``module.compile(...)`` (``nn.Module.compile``, in place): the module's
  ``__call__`` goes through TorchDynamo while its class, its attributes and its ``state_dict`` keys stay
  as they are (``torch.compile(module)`` would return a wrapper whose keys start with ``_orig_mod.``).
  The compiled call is dropped when the module is pickled or deep-copied (``nn.Module.__getstate__``), so
  callers compile again after a copy or in a spawned process (the stages do it in ``setup``). Under DDP
  the inner network is compiled, not the DDP wrapper (PyTorch's advice); gradients then arrive at the end
  of the compiled backward, which loses some communication overlap but stays correct. Compile whole
  networks rather than many blocks of one class: TorchDynamo caches per code object, so sibling blocks
  share one list of compiled variants (at most ``torch._dynamo.config.recompile_limit``, then eager), and
  with ``dynamic=None`` the first shape difference between siblings makes the graph dynamic-shaped, which
  inductor's 3D convolution lowering (torch 2.13) failed on; hence ``dynamic: false`` by default.

Bad values raise :class:`mrrl.errors.ConfigError` naming the config key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mrrl.errors import ConfigError

SPEED_KEY = "stage.speed"
_MODES = ("default", "lite", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
_CONV3D = (nn.Conv3d, nn.ConvTranspose3d)
_CHANNELS_LAST_FLAG = "_mrrl_channels_last_3d"

__all__ = [
    "CompileOptions",
    "SpeedOptions",
    "channels_last_3d",
    "checkpointed_blocks",
    "default_checkpoint_blocks",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "is_compiled",
    "maybe_compile",
    "to_channels_last_3d",
]


# ---------------------------------------------------------------------------------------------- config


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _as_mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:  # an OmegaConf DictConfig without importing omegaconf here
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            return dict(OmegaConf.to_container(value, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    raise ConfigError(f"{key} must be a mapping, got {value!r}")


def _check_keys(values: Mapping[str, Any], allowed: Iterable[str], key: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {key}; known: {sorted(allowed)}")


@dataclass(frozen=True)
class CompileOptions:
    """Arguments of ``torch.compile`` (see :func:`maybe_compile`); ``enabled=False`` compiles nothing."""

    enabled: bool = False
    mode: str = "default"
    backend: str = "inductor"
    dynamic: bool | None = False
    fullgraph: bool = False

    @classmethod
    def from_config(cls, value: Any, key: str = f"{SPEED_KEY}.compile") -> CompileOptions:
        """From a mapping (or ``None``/a bool: off/on with the defaults), checked; errors name ``key``."""
        if isinstance(value, CompileOptions):
            options = value
        elif isinstance(value, bool) or value is None:
            options = cls(enabled=bool(value))
        else:
            values = _as_mapping(value, key)
            _check_keys(values, cls.__dataclass_fields__, key)
            dynamic = values.get("dynamic", False)
            options = cls(
                enabled=_as_bool(values.get("enabled", False), f"{key}.enabled"),
                mode=str(values.get("mode") or "default"),
                backend=str(values.get("backend") or "inductor"),
                dynamic=None if dynamic is None else _as_bool(dynamic, f"{key}.dynamic"),
                fullgraph=_as_bool(values.get("fullgraph", False), f"{key}.fullgraph"),
            )
        options.validate(key)
        return options

    def validate(self, key: str = f"{SPEED_KEY}.compile") -> None:
        """Mode and backend names, checked against this PyTorch (cheap: compiles nothing)."""
        if self.mode not in _MODES:
            raise ConfigError(f"{key}.mode must be one of {list(_MODES)}, got {self.mode!r}")
        if self.backend != "inductor" and self.mode != "default":
            raise ConfigError(
                f"{key}.mode={self.mode!r} is an inductor option: use {key}.backend=inductor or mode=default"
            )
        if not self.enabled:
            return
        backends = torch._dynamo.list_backends(exclude_tags=())
        if self.backend not in backends:
            raise ConfigError(
                f"{key}.backend={self.backend!r} is not a torch.compile backend of this PyTorch; "
                f"choose one of {sorted(backends)}"
            )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``torch.compile``/``nn.Module.compile``."""
        return {
            "mode": None if self.mode == "default" else self.mode,
            "backend": self.backend,
            "dynamic": self.dynamic,
            "fullgraph": self.fullgraph,
        }


@dataclass(frozen=True)
class SpeedOptions:
    """The ``stage.speed`` block, checked. All off by default (behaviour unchanged)."""

    channels_last: bool = False
    gradient_checkpointing: bool = False
    compile: CompileOptions = field(default_factory=CompileOptions)

    @classmethod
    def from_config(cls, value: Any, key: str = SPEED_KEY) -> SpeedOptions:
        """From a mapping such as ``cfg.stage.speed`` (``None``: all off); errors name ``key``."""
        if isinstance(value, SpeedOptions):
            return value
        values = _as_mapping(value, key)
        _check_keys(values, cls.__dataclass_fields__, key)
        return cls(
            channels_last=_as_bool(values.get("channels_last", False), f"{key}.channels_last"),
            gradient_checkpointing=_as_bool(
                values.get("gradient_checkpointing", False), f"{key}.gradient_checkpointing"
            ),
            compile=CompileOptions.from_config(values.get("compile"), f"{key}.compile"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def any(self) -> bool:
        return self.channels_last or self.gradient_checkpointing or self.compile.enabled


# ---------------------------------------------------------------------------------------------- channels-last


def channels_last_3d(x: Any) -> Any:
    """``x`` in ``torch.channels_last_3d`` if it is a 5-D floating-point tensor, else ``x`` unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim == 5 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _inputs_to_channels_last_3d(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook of :func:`to_channels_last_3d` (module-level: picklable, deep-copyable)."""
    return tuple(channels_last_3d(a) for a in args), {k: channels_last_3d(v) for k, v in kwargs.items()}


def to_channels_last_3d(
    module: nn.Module, convert_inputs: bool = True, key: str = f"{SPEED_KEY}.channels_last"
) -> nn.Module:
    """Weights of every 3D (transposed) convolution in ``module`` as ``torch.channels_last_3d``, in place.

    Only the 5-D convolution weights change layout (``module.to(memory_format=...)`` would fail on a 2D
    convolution's 4-D weight); values and ``state_dict`` keys are unchanged, and ``load_state_dict``
    copies into the existing layout. With ``convert_inputs`` a forward pre-hook converts the module's
    5-D floating-point positional and keyword inputs as well (idempotent: one hook per module).

    Raises:
        ConfigError: ``module`` has no 3D convolution (naming ``key``).
    """
    convs = [m for m in module.modules() if isinstance(m, _CONV3D)]
    if not convs:
        raise ConfigError(
            f"{key}=true needs a 3D convolutional network, but {type(module).__name__} has no Conv3d or "
            "ConvTranspose3d"
        )
    for conv in convs:
        conv.to(memory_format=torch.channels_last_3d)
    if convert_inputs and not getattr(module, _CHANNELS_LAST_FLAG, False):
        module.register_forward_pre_hook(_inputs_to_channels_last_3d, with_kwargs=True)
        setattr(module, _CHANNELS_LAST_FLAG, True)
    return module


# ---------------------------------------------------------------------------------------------- checkpointing


class _CheckpointedForward:
    """Stands in for a block's ``forward`` (an instance attribute, so no module is added to the tree).

    Calls the class's ``forward`` through non-reentrant ``torch.utils.checkpoint`` when gradients are being
    recorded (and, with ``require_training``, the block is in training mode), else directly. It holds the
    block itself rather than a bound method, so ``copy.deepcopy`` and pickling rebind it to the copy.
    """

    def __init__(self, block: nn.Module, require_training: bool) -> None:
        self.block = block
        self.require_training = require_training

    def active(self) -> bool:
        return torch.is_grad_enabled() and (self.block.training or not self.require_training)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        forward = type(block).forward.__get__(block)
        if self.active():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


def default_checkpoint_blocks(module: nn.Module) -> list[nn.Module]:
    """The layers worth checkpointing in a MONAI ``DiffusionModelUNet`` (or a ``DenoiserModel`` around one):
    every resnet, attention and down/upsampler inside the down, middle and up blocks.

    Per layer rather than per down/mid/up block: a resnet keeps ~6 activations for backward (two norms, two
    activations, two convolutions) and the skip connections are kept either way, so checkpointing the
    layers frees more. Measured on the CPU (tiny preset UNet [16, 32, 64], batch 8 of 8×16³ latents, one
    step): peak growth 137 MiB plain, 85 MiB per block, 61 MiB per layer, at the same +35 % step time.
    """
    unet = getattr(module, "unet", module)
    parts = ("down_blocks", "middle_block", "up_blocks")
    if not all(hasattr(unet, name) for name in parts):
        raise ConfigError(
            f"gradient checkpointing does not know the blocks of {type(unet).__name__}: pass blocks= "
            "(a list of its sub-modules) to enable_activation_checkpointing"
        )
    layers: list[nn.Module] = []
    for block in [*unet.down_blocks, unet.middle_block, *unet.up_blocks]:
        for child in block.children():
            layers.extend(child if isinstance(child, nn.ModuleList) else [child])
    return [layer for layer in layers if next(layer.parameters(), None) is not None]


def enable_activation_checkpointing(
    module: nn.Module, blocks: Iterable[nn.Module] | None = None, require_training: bool = True
) -> list[str]:
    """Activation (gradient) checkpointing for ``blocks`` of ``module``, in place; their names in ``module``.

    Args:
        module: the network (for the default blocks and the returned names).
        blocks: sub-modules of ``module`` to checkpoint; default :func:`default_checkpoint_blocks`.
            A block's forward may take keyword arguments and return any structure of tensors.
        require_training: checkpoint only in training mode (``block.training``) with grad enabled; False:
            whenever grad is enabled (the PPO policy runs in eval mode while it is trained).

    Idempotent; :func:`disable_activation_checkpointing` undoes it.
    """
    blocks = default_checkpoint_blocks(module) if blocks is None else list(blocks)
    names = {id(m): name for name, m in module.named_modules()}
    wrapped = []
    for block in blocks:
        if id(block) not in names:
            raise ValueError(f"{type(block).__name__} is not a sub-module of {type(module).__name__}")
        block.forward = _CheckpointedForward(block, require_training)  # type: ignore[method-assign]
        wrapped.append(names[id(block)])
    return wrapped


def disable_activation_checkpointing(module: nn.Module) -> None:
    """Remove what :func:`enable_activation_checkpointing` did anywhere in ``module``."""
    for block in module.modules():
        if isinstance(block.__dict__.get("forward"), _CheckpointedForward):
            del block.__dict__["forward"]


def checkpointed_blocks(module: nn.Module) -> list[str]:
    """Names of the checkpointed sub-modules of ``module``."""
    return [
        n for n, m in module.named_modules() if isinstance(m.__dict__.get("forward"), _CheckpointedForward)
    ]


# ---------------------------------------------------------------------------------------------- compile


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` was called on this very object (not a copy of it)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def maybe_compile(module: nn.Module, options: Any, key: str = f"{SPEED_KEY}.compile") -> bool:
    """``module.compile(mode=, backend=, dynamic=, fullgraph=)`` in place if ``options`` enable it.

    ``options``: a :class:`CompileOptions`, a mapping with its fields, a bool or None. Compiling happens
    lazily at the first call (expect seconds to minutes; each new input shape or grad mode may compile
    again). Returns whether ``module`` is compiled now; a module already compiled is left alone.

    ``nn.Module.compile`` keeps the module's class and ``state_dict`` keys (Lightning checkpoints and
    ``load_state_dict`` are unaffected) and works inside DDP; the Lightning docs' alternative,
    ``torch.compile(lightning_module)``, compiles the ``*_step`` methods too, which in mrrl hold host syncs
    and manual optimisation (graph breaks), so the networks are compiled instead.
    """
    options = CompileOptions.from_config(options, key)
    if not options.enabled:
        return False
    if not is_compiled(module):
        module.compile(**options.kwargs())
    return True
