"""Model presets: every size of the method (``tiny``, ``small``, ``sd15``) as data, never as code.

A preset is a JSON file in ``consistent_avatar/presets/<name>.json`` parsed into :class:`ModelPreset`.
It records what the models of stages 2 and 3 are built from: image resolution, the VAE (whose
downsampling factor fixes the latent resolution), the UNet and ControlNet kwargs handed to the
diffusers configs, the condition tokens (paper: 256-d tokens, 768-d emotion text embedding), the
TSD encoder, the DDPM noise schedule used for training, which parts each stage trains, and optional
local directories of pretrained components. Derived shapes (UNet ``in_channels``, ``sample_size``)
are computed here, so a preset cannot contradict itself; every cross-field rule is checked at load
and a bad preset raises :class:`~consistent_avatar.errors.ConsistentAvatarError` naming the field.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..data.layout import EXPRESSION_DIM, POSE_DIM
from ..errors import ConsistentAvatarError

CONTROL_CHANNELS = 6
"""ControlNet input z_c = concat(coarse normal (3), aligned TSD (3)) (paper eq. 8)."""

_CROSS_DOWN = "CrossAttnDownBlock2D"
_PLAIN_DOWN = "DownBlock2D"
_CROSS_UP = "CrossAttnUpBlock2D"
_PLAIN_UP = "UpBlock2D"


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a preset must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class VAEConfig(_Strict):
    """An ``AutoencoderKL``: one ``DownEncoderBlock2D``/``UpDecoderBlock2D`` per entry of channels."""

    block_out_channels: tuple[int, ...] = Field(min_length=1)
    layers_per_block: int = Field(ge=1)
    norm_num_groups: int = Field(ge=1)
    latent_channels: int = Field(ge=1)
    scaling_factor: float = Field(gt=0)

    @property
    def scale_factor(self) -> int:
        """Image side / latent side: each block but the last halves the resolution."""
        return 2 ** (len(self.block_out_channels) - 1)

    @model_validator(mode="after")
    def _groups_divide(self) -> VAEConfig:
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"vae.block_out_channels entry {c} is not divisible by norm_num_groups")
        return self

    def diffusers_kwargs(self, resolution: int) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * n,
            "up_block_types": ("UpDecoderBlock2D",) * n,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": resolution,
            "scaling_factor": self.scaling_factor,
        }


class UNetConfig(_Strict):
    """A ``UNet2DConditionModel``. ``attention_head_dim`` keeps diffusers' (legacy) meaning: heads."""

    block_out_channels: tuple[int, ...] = Field(min_length=1)
    down_block_types: tuple[Literal["CrossAttnDownBlock2D", "DownBlock2D"], ...]
    up_block_types: tuple[Literal["CrossAttnUpBlock2D", "UpBlock2D"], ...]
    layers_per_block: int = Field(ge=1)
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = Field(ge=1)
    norm_num_groups: int = Field(ge=1)
    transformer_layers_per_block: int = Field(default=1, ge=1)
    use_linear_projection: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "unet.down_block_types and unet.up_block_types need one entry per block_out_channels"
            )
        if _CROSS_DOWN not in self.down_block_types:
            raise ValueError("unet needs at least one CrossAttnDownBlock2D: decoupled attention lives there")
        heads = (
            (self.attention_head_dim,) * n
            if isinstance(self.attention_head_dim, int)
            else self.attention_head_dim
        )
        if len(heads) != n:
            raise ValueError("unet.attention_head_dim as a list needs one entry per block_out_channels")
        for c, h in zip(self.block_out_channels, heads, strict=True):
            if c % self.norm_num_groups:
                raise ValueError(f"unet.block_out_channels entry {c} is not divisible by norm_num_groups")
            if c % h:
                raise ValueError(f"unet.block_out_channels entry {c} is not divisible by {h} attention heads")
        return self

    def diffusers_kwargs(self, *, in_channels: int, out_channels: int, sample_size: int) -> dict[str, Any]:
        return {
            "sample_size": sample_size,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "block_out_channels": self.block_out_channels,
            "down_block_types": self.down_block_types,
            "up_block_types": self.up_block_types,
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.norm_num_groups,
            "transformer_layers_per_block": self.transformer_layers_per_block,
            "use_linear_projection": self.use_linear_projection,
        }


class ControlNetConfig(_Strict):
    """The ControlNet's image-space condition encoder (ControlNet paper: a few stride-2 convs)."""

    conditioning_embedding_out_channels: tuple[int, ...] = Field(min_length=1)


class TSDEncoderConfig(_Strict):
    """Conv encoder image → one global code (each stage halves the resolution)."""

    channels: tuple[int, ...] = Field(min_length=1)
    norm_num_groups: int = Field(ge=1)

    @model_validator(mode="after")
    def _groups_divide(self) -> TSDEncoderConfig:
        for c in self.channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"conditioning.tsd_encoder.channels entry {c} is not divisible by norm_num_groups"
                )
        return self


class ConditioningConfig(_Strict):
    """Condition tokens f_c (stage 2) and f_d (stage 3); pose/expression sizes come from the data layout."""

    token_dim: int = Field(default=256, ge=1)
    emotion_dim: int = Field(default=768, ge=1)
    null_context_tokens: int = Field(ge=1, le=77)
    decoupled_scale: float = 1.0
    tsd_encoder: TSDEncoderConfig

    @property
    def pose_dim(self) -> int:
        return POSE_DIM

    @property
    def expression_dim(self) -> int:
        return EXPRESSION_DIM


class NoiseScheduleConfig(_Strict):
    """The DDPM forward process both stages are trained under (SD 1.5's by default)."""

    num_train_timesteps: int = Field(default=1000, ge=2)
    beta_start: float = Field(default=0.00085, gt=0)
    beta_end: float = Field(default=0.012, gt=0)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"

    def make_ddpm(self) -> Any:
        """A diffusers ``DDPMScheduler`` with ε-prediction (paper eq. 6 and 9)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            prediction_type="epsilon",
            clip_sample=False,
        )


class TrainingScopeConfig(_Strict):
    """Which base weights each stage trains besides its new layers (which always train).

    ``tsdm_unet``: ``full`` fine-tunes the whole UNet (TSD images are far from SD's domain; also the
    only option from random init); ``conv_in`` trains only the widened input convolution.
    ``fcsd_unet``: ``frozen`` locks the base UNet as the ControlNet paper does (pretrained SD);
    ``full`` trains it too (needed when it starts from random weights).
    """

    tsdm_unet: Literal["full", "conv_in"]
    fcsd_unet: Literal["frozen", "full"]


class PretrainedConfig(_Strict):
    """Local directories of pretrained components (no hub). ``root`` is a Stable Diffusion 1.5 folder
    (``unet/ vae/ text_encoder/ tokenizer/``); a per-component path overrides its subfolder."""

    root: str | None = None
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    controlnet: str | None = None

    def resolve(
        self, component: Literal["unet", "vae", "text_encoder", "tokenizer", "controlnet"]
    ) -> Path | None:
        """The directory to load ``component`` from, or None for random init.

        An explicitly named directory must exist. Under ``root``, ``unet`` and ``vae`` must exist;
        ``text_encoder``/``tokenizer`` are used only if present; ``controlnet`` never comes from root.
        """
        explicit = getattr(self, component)
        if explicit is not None:
            path = Path(explicit).expanduser()
            if not (path / "config.json").is_file() and component != "tokenizer":
                raise ConsistentAvatarError(
                    f"pretrained.{component} = {str(path)!r} has no config.json: point it at a "
                    f"diffusers/transformers {component} directory"
                )
            if component == "tokenizer" and not path.is_dir():
                raise ConsistentAvatarError(f"pretrained.tokenizer = {str(path)!r} is not a directory")
            return path
        if self.root is None or component == "controlnet":
            return None
        path = Path(self.root).expanduser() / component
        if component in ("unet", "vae") and not (path / "config.json").is_file():
            raise ConsistentAvatarError(
                f"pretrained.root = {self.root!r} has no {component}/config.json: give a Stable Diffusion "
                f"1.5 folder (unet/, vae/, text_encoder/, tokenizer/) or set pretrained.{component}"
            )
        return path if path.is_dir() else None


class ModelPreset(_Strict):
    """One size of the whole model stack. Load with :func:`load_preset`."""

    name: str
    resolution: int = Field(ge=8)
    vae: VAEConfig
    unet: UNetConfig
    controlnet: ControlNetConfig
    conditioning: ConditioningConfig
    noise_schedule: NoiseScheduleConfig = NoiseScheduleConfig()
    training: TrainingScopeConfig
    pretrained: PretrainedConfig = PretrainedConfig()

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae.scale_factor

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModelPreset:
        f = self.vae.scale_factor
        if self.resolution % f:
            raise ValueError(f"resolution {self.resolution} is not divisible by the VAE scale factor {f}")
        down = 2 ** (len(self.unet.block_out_channels) - 1)
        if self.latent_size % down:
            raise ValueError(
                f"latent size {self.latent_size} is not divisible by the UNet's total downsampling {down}"
            )
        n_cond = len(self.controlnet.conditioning_embedding_out_channels)
        if n_cond != int(math.log2(f)) + 1:
            raise ValueError(
                f"controlnet.conditioning_embedding_out_channels has {n_cond} entries; it needs "
                f"log2(vae scale factor {f}) + 1 = {int(math.log2(f)) + 1} to map {self.resolution}² images "
                f"onto {self.latent_size}² latents"
            )
        if 2 ** len(self.conditioning.tsd_encoder.channels) > self.resolution:
            raise ValueError("conditioning.tsd_encoder has more stride-2 stages than the resolution allows")
        return self

    def unet_kwargs(self, in_channels: int | None = None) -> dict[str, Any]:
        """diffusers ``UNet2DConditionModel`` kwargs; ``in_channels`` defaults to the latent channels."""
        return self.unet.diffusers_kwargs(
            in_channels=in_channels or self.latent_channels,
            out_channels=self.latent_channels,
            sample_size=self.latent_size,
        )

    def vae_kwargs(self) -> dict[str, Any]:
        return self.vae.diffusers_kwargs(self.resolution)

    def with_pretrained(self, **paths: str | None) -> ModelPreset:
        """A copy whose ``pretrained`` section is updated (e.g. ``root="/models/sd15"``)."""
        merged = {**self.pretrained.model_dump(), **paths}
        return parse_preset({**self.model_dump(mode="json"), "pretrained": merged})


def available_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("consistent_avatar") / "presets"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def parse_preset(data: dict[str, Any]) -> ModelPreset:
    """Validate a preset mapping; every problem becomes one ConsistentAvatarError listing the fields."""
    try:
        return ModelPreset.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<preset>'}: {e['msg']}" for e in exc.errors()
        )
        name = data.get("name", "<unnamed>") if isinstance(data, dict) else "<not a mapping>"
        raise ConsistentAvatarError(f"model preset {name!r} is invalid: {problems}") from None


def load_preset(name_or_path: str | Path) -> ModelPreset:
    """Load a shipped preset by name (``tiny``, ``small``, ``sd15``) or a preset JSON file by path."""
    text: str
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.is_file():
        if not candidate.is_file():
            raise ConsistentAvatarError(f"model preset file {str(candidate)!r} does not exist")
        text = candidate.read_text(encoding="utf-8")
        where = str(candidate)
    else:
        resource = resources.files("consistent_avatar") / "presets" / f"{name_or_path}.json"
        if not resource.is_file():
            raise ConsistentAvatarError(
                f"unknown model preset {str(name_or_path)!r}: choose one of {available_presets()} "
                f"or give the path of a preset JSON file"
            )
        text = resource.read_text(encoding="utf-8")
        where = f"preset {name_or_path!r}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConsistentAvatarError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConsistentAvatarError(f"{where} must hold a JSON object")
    return parse_preset(data)
