"""Model config dataclasses (METHOD.md section 1): one per network, holding the paper's defaults.

Each network takes only its own slice (`Generator(GeneratorConfig())`); the trainer nests these same
frozen dataclasses in its config tree (`model.generator`, ...), so a new option is one field here.
Values are checked in `__post_init__`; a bad value raises ValueError naming the field and the value.
Derive a changed config with `dataclasses.replace`. Imports nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONES = ("alexnet-imagenet", "vgg16-imagenet", "resnet18-scratch")


def _check_positive_ints(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        # bool is an int subclass; `width=True` is a typo, not a width of 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be an int >= 1, got {value!r}")


def _check_bools(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise ValueError(f"{type(obj).__name__}.{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class GeneratorConfig:
    """CUT resnet_9blocks split after ResBlock 5, AdaIN decoder (METHOD.md 1.1)."""

    width: int = 64  # ngf: stem width; the body runs at 4 * width
    n_blocks_encoder: int = 5  # plain-IN ResBlocks in E (the last one is tap f4)
    n_blocks_decoder: int = 4  # AdaIN ResBlocks in Dec
    antialias: bool = True  # CUT's BlurPool down / [1,3,3,1] up; False = strided conv / ConvTranspose
    mlp_dim: int = 256  # hidden width of the colour-feature MLP (MUNIT)
    color_dim: int = 313  # length of the colour feature c
    adain_scale_offset: bool = True  # y1 = 1 + delta with the MLP's last layer zero-initialised

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("width", "n_blocks_encoder", "n_blocks_decoder", "mlp_dim", "color_dim"))
        _check_bools(self, ("antialias", "adain_scale_offset"))


@dataclass(frozen=True)
class SamplerConfig:
    """The patch sampler's MLP heads F (METHOD.md 1.2)."""

    num_patches: int = 256  # patches per tap (fewer when a tap has fewer positions)
    dim: int = 256  # width of both MLP layers and of the output rows

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("num_patches", "dim"))


@dataclass(frozen=True)
class DiscriminatorConfig:
    """70x70 PatchGAN conditioned on the tiled colour feature (METHOD.md 1.4)."""

    width: int = 64  # ndf
    n_layers: int = 3  # stride-2 convs; 3 gives the 70x70 receptive field
    color_dim: int = 313

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("width", "n_layers", "color_dim"))


@dataclass(frozen=True)
class ExtractorConfig:
    """Memory feature extractor f_q (METHOD.md 1.3 and 8.2)."""

    backbone: str = "alexnet-imagenet"  # one of BACKBONES
    dim: int = 512  # query length
    resnet_width: int = 64  # stem width of resnet18-scratch (features = 8 * resnet_width)
    # The pretrained backbone's last N convs are trained in phase 1 too (0: the head alone, the paper).
    # Trained convs are saved with the head, so they change the checkpoint's contents (a shape key).
    train_convs: int = 0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"ExtractorConfig.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        _check_positive_ints(self, ("dim", "resnet_width"))
        if not isinstance(self.train_convs, int) or self.train_convs < 0:
            raise ValueError(f"ExtractorConfig.train_convs must be an int >= 0, got {self.train_convs!r}")
        if self.train_convs and self.backbone == "resnet18-scratch":
            raise ValueError(f"ExtractorConfig.train_convs={self.train_convs} needs a pretrained backbone: "
                             "resnet18-scratch trains all of its layers already")

