"""The model layer of ConsistentAvatar: presets, condition tokens, decoupled attention, TSDM, FCSD.

Models only — noise schedulers for sampling, LCM distillation and the render pipeline live
elsewhere and call these modules through their documented signatures::

    tokens = tsdm.condition(coarse_tsd, pose, expression)             # f_c (B, 3, 256)
    eps = tsdm(x_t, t, tokens, tsdm.encode(coarse_tsd))               # stage 2
    tokens = fcsd.condition(tsd, pose, expression, emotion)           # f_d (B, 4, 256)
    eps = fcsd(x_t, t, tokens, fcsd.control_image(normal, tsd))       # stage 3
"""

from .components import (
    SharedComponents,
    load_controlnet,
    load_shared_components,
    load_text_encoder,
    load_unet,
    load_vae,
    save_random_components,
    vae_decode,
    vae_encode,
)
from .conditioning import ConditionTokens, StageConditioning, TSDEncoder
from .decoupled_attention import (
    COND_TOKENS_KWARG,
    DecoupledCrossAttnProcessor,
    NullContext,
    install_decoupled_attention,
    set_decoupled_scale,
)
from .fcsd import FCSD, build_fcsd
from .objective import TrainingObjective
from .presets import ModelPreset, available_presets, load_preset, parse_preset
from .tsdm import TSDM, build_tsdm

__all__ = [
    "COND_TOKENS_KWARG",
    "FCSD",
    "TSDM",
    "ConditionTokens",
    "DecoupledCrossAttnProcessor",
    "ModelPreset",
    "NullContext",
    "SharedComponents",
    "StageConditioning",
    "TSDEncoder",
    "TrainingObjective",
    "available_presets",
    "build_fcsd",
    "build_tsdm",
    "install_decoupled_attention",
    "load_controlnet",
    "load_preset",
    "load_shared_components",
    "load_text_encoder",
    "load_unet",
    "load_vae",
    "parse_preset",
    "save_random_components",
    "set_decoupled_scale",
    "vae_decode",
    "vae_encode",
]
