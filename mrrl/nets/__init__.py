"""Network builders and losses (mostly MONAI): the VQGAN generator, its quantiser, discriminators, GAN losses,
and the speed/memory options shared by the 3D networks (``mrrl.nets.speed``).

Names are imported lazily (PEP 562), so ``import mrrl.nets.quantizer`` does not pay for importing MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "discriminators": (
        "DiscriminatorOutput",
        "PatchDiscriminator",
        "SliceDiscriminator",
        "VolumeDiscriminator",
        "axial_slices",
        "random_axial_slices",
    ),
    "gan_losses": (
        "GAN_LOSSES",
        "PerceptualLoss",
        "PerceptualWeightsMissingError",
        "adaptive_adversarial_weight",
        "adversarial_factor",
        "build_perceptual_loss",
        "discriminator_loss",
        "feature_matching_loss",
        "find_perceptual_weights",
        "generator_loss",
    ),
    "quantizer": ("QuantizerOutput", "VectorQuantizerEMA", "nearest_codes"),
    "speed": (
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
    ),
    "vqgan": ("VQGAN", "VQGANConfig", "VQGANOutput"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from mrrl.nets.discriminators import (  # noqa: F401
        DiscriminatorOutput,
        PatchDiscriminator,
        SliceDiscriminator,
        VolumeDiscriminator,
        axial_slices,
        random_axial_slices,
    )
    from mrrl.nets.gan_losses import (  # noqa: F401
        GAN_LOSSES,
        PerceptualLoss,
        PerceptualWeightsMissingError,
        adaptive_adversarial_weight,
        adversarial_factor,
        build_perceptual_loss,
        discriminator_loss,
        feature_matching_loss,
        find_perceptual_weights,
        generator_loss,
    )
    from mrrl.nets.quantizer import QuantizerOutput, VectorQuantizerEMA, nearest_codes  # noqa: F401
    from mrrl.nets.speed import (  # noqa: F401
        CompileOptions,
        SpeedOptions,
        channels_last_3d,
        checkpointed_blocks,
        default_checkpoint_blocks,
        disable_activation_checkpointing,
        enable_activation_checkpointing,
        is_compiled,
        maybe_compile,
        to_channels_last_3d,
    )
    from mrrl.nets.vqgan import VQGAN, VQGANConfig, VQGANOutput  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mrrl.nets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mrrl.nets.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
