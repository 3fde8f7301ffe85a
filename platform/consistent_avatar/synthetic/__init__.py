"""Built-in synthetic actors: the platform's embedded default data (no real talking-head data needed).

:mod:`.emotions` is the emotion expression model (also the source of the synthetic MEAD database),
:mod:`.motion` the per-actor trajectories and stage-1 codes, :mod:`.head` the procedural head and its
renderer, :mod:`.actors` writes actors in the INSTA layout of :mod:`consistent_avatar.data.layout`.
"""

from .actors import (
    GENERATOR_VERSION,
    SynthConfig,
    actor_emotion_schedule,
    actor_name,
    synthesize_actor,
    synthesize_actors,
    write_video_actor,
)
from .emotions import (
    EMOTION_PROFILES,
    NUM_SEMANTIC_DIMS,
    EmotionProfile,
    Expr,
    SpeakerStyle,
    emotion_prototypes,
    expression_trajectory,
    sample_mead_expressions,
    sample_speaker_style,
)
from .head import (
    FrameOutput,
    FrameRenderer,
    HeadIdentity,
    HeadModel,
    HeadRenderer,
    RenderedView,
    Stage1Degradation,
    camera_intrinsics,
    decode_normals,
    encode_normals,
    sample_identity,
)
from .motion import ActorMotion, actor_motion, emotion_schedule, frame_rng, pose_trajectory, stage1_codes

__all__ = [
    "EMOTION_PROFILES",
    "GENERATOR_VERSION",
    "NUM_SEMANTIC_DIMS",
    "ActorMotion",
    "EmotionProfile",
    "Expr",
    "FrameOutput",
    "FrameRenderer",
    "HeadIdentity",
    "HeadModel",
    "HeadRenderer",
    "RenderedView",
    "SpeakerStyle",
    "Stage1Degradation",
    "SynthConfig",
    "actor_emotion_schedule",
    "actor_motion",
    "actor_name",
    "camera_intrinsics",
    "decode_normals",
    "emotion_prototypes",
    "emotion_schedule",
    "encode_normals",
    "expression_trajectory",
    "frame_rng",
    "pose_trajectory",
    "sample_identity",
    "sample_mead_expressions",
    "sample_speaker_style",
    "stage1_codes",
    "synthesize_actor",
    "synthesize_actors",
    "write_video_actor",
]
