"""Actor bundles: everything needed to render one actor, as one directory of safetensors and JSON.

Training ends by exporting a bundle; the render job and the serve replicas start from one. A bundle
is self-contained (no pretrained directory, model hub or shard dataset is needed to load it) and
versioned. Layout (schema 1)::

    <bundle>/
      bundle.json                 the manifest, written LAST: schema_version, actor, created_at,
                                  versions (package, torch, diffusers, safetensors, python), the
                                  variants of each stage, LCM distillation settings, sampling
                                  defaults, TSD settings, the refiner reference, the sha256 +
                                  size of every other file, and the VAE's identity by content
                                  (``vae_identity``: see consistent_avatar.vae_identity)
      preset.json                 the ModelPreset the networks were built from
      emotions.parquet            emotion table: label, id, CLIP text embedding (the shard schema)
      vae/                        the frozen VAE, diffusers layout (stored once: both stages share it)
      null_context.safetensors    {"context": (n, cross_attention_dim)} (once: both stages share it)
      tsdm/config.json            {"unet": diffusers config}: stage 2's exact architecture
      tsdm/teacher.safetensors    the ε-model (state dict without ``vae.*`` and ``null_context.*``)
      tsdm/lcm.safetensors        the LCM student (see below)
      fcsd/config.json            {"unet": ..., "controlnet": ...}
      fcsd/teacher.safetensors, fcsd/lcm.safetensors
      training.json               optional provenance from the trainer

Variants. Each stage holds a ``teacher`` (the ε-model trained with eq. 6 / 9, sampled with DDIM or
DPM-Solver) and/or an ``lcm`` student (consistency-distilled, few-step). Distillation only trains what
the teacher trained, so a student shares the teacher's frozen tensors bitwise (sd15's FCSD freezes its
3.4 GB base UNet): when both are present the student file holds only the tensors that differ from the
teacher (``base = "teacher"`` in the manifest) and loading overlays it on the teacher's file.

Architecture. The diffusers configs of the networks are stored, not re-derived from the preset at load
time: a pretrained UNet or ControlNet may carry config fields the preset does not spell out. Loading
builds the networks on the ``meta`` device (no random init of 860 M parameters to throw away),
allocates them on the target device in the target dtype and copies the stored weights in, checked
strictly (every tensor present, none extra, shapes equal).

Integrity. ``bundle.json`` appears last, so a bundle without it is incomplete. Every file's sha256 is
checked on load (``verify=False`` skips it); a bundle of another schema version is refused with an
error that says what to do.

Storage. ``path_or_uri`` is a local path or any ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``,
``hdfs://``); a ``file://`` URI is read in place. A bundle on a non-local filesystem is copied into a
local cache directory first (``$CONSISTENT_AVATAR_CACHE/bundles``, else
``~/.cache/consistent_avatar/bundles``; one folder per bundle version, reused while its ``bundle.json``
is unchanged). The cache is bounded: after each fetch the least recently used bundles are deleted until
the cache holds at most ``$CONSISTENT_AVATAR_BUNDLE_CACHE_GB`` GB (default 50; ``inf`` or ``none``:
unlimited; ``cache_limit_bytes=`` of :func:`load_bundle` overrides it). A process loading a cached
bundle holds a shared ``flock`` on ``<cache>/<entry>.lock`` until its files are read, and the pruner
skips entries it cannot lock exclusively, so pool actors on one node never delete a bundle under each
other; the bundle just fetched is never pruned (one larger than the limit is kept, with a warning).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import platform as _platform
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from . import __version__
from .data.shards import emotion_table_schema
from .errors import ConsistentAvatarError
from .io import atomic_write_bytes, atomic_write_json, publish_dir, read_json, resolve_filesystem, staging_dir
from .models.components import LOCAL_LOAD, freeze, load_shared_components, load_vae
from .models.decoupled_attention import DecoupledCrossAttnProcessor, set_decoupled_scale
from .models.fcsd import FCSD
from .models.lcm import LCMDistillConfig
from .models.presets import CONTROL_CHANNELS, ModelPreset, parse_preset
from .models.sampling import SchedulerKind, Spacing
from .models.tsdm import TSDM
from .vae_identity import model_identity
from .tsd import TSDConfig

log = logging.getLogger(__name__)

BUNDLE_SCHEMA_VERSION = 1
MANIFEST_FILE = "bundle.json"
PRESET_FILE = "preset.json"
EMOTIONS_FILE = "emotions.parquet"
VAE_DIR = "vae"
NULL_CONTEXT_FILE = "null_context.safetensors"
TRAINING_FILE = "training.json"
CONFIG_FILE = "config.json"
CACHE_ENV = "CONSISTENT_AVATAR_CACHE"
CACHE_LIMIT_ENV = "CONSISTENT_AVATAR_BUNDLE_CACHE_GB"
#: room for ten sd15 bundles (~5 GB each): one being loaded per GPU of an 8-GPU node, and two more
DEFAULT_CACHE_LIMIT_GB = 50.0

Stage = Literal["tsdm", "fcsd"]
Variant = Literal["teacher", "lcm"]
STAGES: tuple[Stage, ...] = get_args(Stage)
VARIANTS: tuple[Variant, ...] = get_args(Variant)
#: the keys of ``save_bundle(weights=...)``: the training stage names
WEIGHT_KEYS: dict[str, tuple[Stage, Variant]] = {
    "tsdm": ("tsdm", "teacher"),
    "lcm_tsdm": ("tsdm", "lcm"),
    "fcsd": ("fcsd", "teacher"),
    "lcm_fcsd": ("fcsd", "lcm"),
}
_SKIPPED_PREFIXES = ("vae.", "null_context.")
_NULL_KEY = "null_context.context"

WeightsSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(_Strict):
    """How a bundle is sampled unless a call says otherwise.

    ``sampler``/``num_steps`` apply to the LCM students; ``teacher_sampler``/``teacher_steps`` to the
    teachers (the paper's "w/o LCM" row, or a bundle without students). ``spacing`` is the DDIM/DPM
    timestep spacing (see :func:`consistent_avatar.models.sampling.inference_scheduler`).
    """

    sampler: SchedulerKind = "lcm"
    num_steps: int = Field(4, ge=1, le=1000)
    teacher_sampler: Literal["ddim", "dpm"] = "ddim"
    teacher_steps: int = Field(25, ge=1, le=1000)
    spacing: Spacing = "trailing"


class RefinerReference(_Strict):
    """An SDXL refiner the bundle is meant to be rendered with: a *reference* (path), not a copy.

    The refiner is ~6 GB and the same for every actor, so bundles point at one local directory
    (``Refiner.from_pretrained`` layout); a render host may override the path.
    """

    path: str
    strength: float = Field(0.2, ge=0.0, le=1.0)
    num_steps: int = Field(20, ge=1)


class Versions(_Strict):
    package: str
    torch: str
    diffusers: str
    safetensors: str
    python: str


class FileEntry(_Strict):
    sha256: str
    bytes: int


class VariantEntry(_Strict):
    file: str
    base: Literal["teacher"] | None = None  # the student file holds only what differs from the teacher
    tensors: int  # tensors in the variant's complete state (own file + base)


class StageEntry(_Strict):
    config: str
    variants: dict[Variant, VariantEntry]
    lcm: LCMDistillConfig | None = None  # the distillation the ``lcm`` variant was trained with


class BundleManifest(_Strict):
    schema_version: int
    actor: str
    created_at: str
    versions: Versions
    stages: dict[Stage, StageEntry]
    sampling: SamplingDefaults = SamplingDefaults()
    tsd: TSDConfig = Field(default_factory=TSDConfig)
    refiner: RefinerReference | None = None
    emotions: int
    sources: dict[str, str] = {}
    files: dict[str, FileEntry]
    #: the VAE's identity by content (:mod:`consistent_avatar.vae_identity`), computed from the model
    #: that ``vae/`` was saved from; None in bundles written before it was recorded
    vae_identity: dict[str, str] | None = None


# ------------------------------------------------------------------------------------------------
# Emotion table
# ------------------------------------------------------------------------------------------------


@dataclass
class EmotionTable:
    """The actor's emotion labels (id = row) and their CLIP text embeddings T (eq. 7), (L, D)."""

    labels: tuple[str, ...]
    embeddings: torch.Tensor

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        if not self.labels:
            raise ConsistentAvatarError("the emotion table is empty: it needs at least one label")
        if any(not isinstance(x, str) or not x for x in self.labels):
            raise ConsistentAvatarError("emotion labels must be non-empty strings")
        if len(set(self.labels)) != len(self.labels):
            raise ConsistentAvatarError(f"emotion labels must be unique, got {list(self.labels)}")
        emb = self.embeddings
        if isinstance(emb, np.ndarray):
            emb = torch.from_numpy(np.ascontiguousarray(emb))
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
            raise ConsistentAvatarError("emotion embeddings must be a float (labels, dim) tensor or array")
        if emb.shape[0] != len(self.labels):
            raise ConsistentAvatarError(
                f"emotion table has {len(self.labels)} labels but {emb.shape[0]} embedding rows"
            )
        if not bool(torch.isfinite(emb).all()):
            raise ConsistentAvatarError("emotion embeddings contain NaN or infinite values")
        self.embeddings = emb
        self._index = {name: i for i, name in enumerate(self.labels)}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EmotionTable:
        return EmotionTable(self.labels, self.embeddings.to(device=device, dtype=dtype))

    def ids(self, labels: Sequence[str]) -> torch.Tensor:
        """Label names → ids (B,) long; an unknown name is an error listing the known ones."""
        out = []
        for name in labels:
            if name not in self._index:
                raise ConsistentAvatarError(
                    f"unknown emotion label {name!r}; this actor knows {list(self.labels)}"
                )
            out.append(self._index[name])
        return torch.tensor(out, dtype=torch.long)

    def lookup(self, emotion: object, batch: int) -> torch.Tensor:
        """T (B, D) for ``emotion``: label(s), id(s) or embeddings; validated, nothing else runs.

        Accepted: one label (str) or id (int) for the whole batch; a list/tuple of B labels or ids;
        a (B,) integer tensor/array of ids; a (B, D) float tensor/array of embeddings.
        """
        if isinstance(emotion, np.ndarray):
            emotion = torch.from_numpy(emotion)
        if isinstance(emotion, str) or (isinstance(emotion, int) and not isinstance(emotion, bool)):
            emotion = [emotion] * batch  # one label or id for the whole batch
        if isinstance(emotion, (list, tuple)):
            if len(emotion) != batch:
                raise ConsistentAvatarError(
                    f"emotion has {len(emotion)} entries, the other inputs have batch size {batch}"
                )
            if all(isinstance(e, str) for e in emotion):
                return self.embeddings[self.ids(emotion).to(self.embeddings.device)]
            if all(isinstance(e, int) and not isinstance(e, bool) for e in emotion):
                emotion = torch.tensor(list(emotion), dtype=torch.long)
            else:
                raise ConsistentAvatarError(
                    "emotion as a list must hold only labels (str) or only ids (int), "
                    f"got {[type(e).__name__ for e in emotion][:4]}"
                )
        if not isinstance(emotion, torch.Tensor):
            raise ConsistentAvatarError(
                "emotion must be a label, a list of labels, ids (B,) or embeddings "
                f"(B, {self.dim}); got {type(emotion).__name__}"
            )
        if emotion.dtype == torch.bool:
            raise ConsistentAvatarError("emotion ids must be integers, got a bool tensor")
        if not emotion.is_floating_point() and not emotion.is_complex():
            if emotion.ndim != 1 or emotion.shape[0] != batch:
                raise ConsistentAvatarError(
                    f"emotion ids must have shape ({batch},), got {tuple(emotion.shape)}"
                )
            if emotion.numel() and (int(emotion.min()) < 0 or int(emotion.max()) >= len(self.labels)):
                raise ConsistentAvatarError(
                    f"emotion ids must lie in [0, {len(self.labels)}) ({list(self.labels)}), "
                    f"got {emotion.tolist()}"
                )
            return self.embeddings[emotion.to(self.embeddings.device).long()]
        if emotion.is_complex() or emotion.ndim != 2 or emotion.shape != (batch, self.dim):
            raise ConsistentAvatarError(
                f"emotion embeddings must have shape ({batch}, {self.dim}), got {tuple(emotion.shape)} "
                f"(or give labels / ids)"
            )
        if not bool(torch.isfinite(emotion).all()):
            raise ConsistentAvatarError("emotion embeddings contain NaN or infinite values")
        return emotion.to(device=self.embeddings.device, dtype=self.embeddings.dtype)

    def write(self, path: Path) -> None:
        table = pa.table(
            {
                "label": list(self.labels),
                "emotion_id": list(range(len(self.labels))),
                "embedding": [row.tolist() for row in self.embeddings.float().cpu().numpy()],
            },
            schema=emotion_table_schema(self.dim),
        )
        pq.write_table(table, path)

    @classmethod
    def read(cls, path: Path) -> EmotionTable:
        try:
            table = pq.read_table(path).sort_by("emotion_id")
            labels = table["label"].to_pylist()
            emb = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
        except (pa.ArrowException, KeyError, OSError) as exc:
            raise ConsistentAvatarError(f"bundle emotion table {path} is unreadable: {exc}") from exc
        return cls(tuple(labels), torch.from_numpy(emb))


# ------------------------------------------------------------------------------------------------
# The loaded bundle
# ------------------------------------------------------------------------------------------------


@dataclass
class ActorBundle:
    """A loaded bundle: the networks of the requested variants on ``device`` in ``dtype``.

    ``tsdm[variant]`` / ``fcsd[variant]`` are inference-ready (eval, no grad) and share one VAE.
    Build a renderer with :meth:`consistent_avatar.pipeline.ConsistentAvatarPipeline.from_bundle`.
    """

    root: Path
    uri: str
    manifest: BundleManifest
    preset: ModelPreset
    emotions: EmotionTable
    vae: AutoencoderKL
    tsdm: dict[Variant, TSDM]
    fcsd: dict[Variant, FCSD]
    device: torch.device
    dtype: torch.dtype
    training: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def actor(self) -> str:
        return self.manifest.actor

    @property
    def sampling(self) -> SamplingDefaults:
        return self.manifest.sampling

    @property
    def refiner(self) -> RefinerReference | None:
        return self.manifest.refiner

    def lcm_config(self, stage: Stage) -> LCMDistillConfig:
        """The distillation settings of ``stage``'s student (its sampler must use the same grid)."""
        return self.manifest.stages[stage].lcm or LCMDistillConfig()

    def available_variants(self, stage: Stage) -> tuple[Variant, ...]:
        """Variants stored in the bundle (not only the loaded ones)."""
        return tuple(v for v in VARIANTS if v in self.manifest.stages[stage].variants)


# ------------------------------------------------------------------------------------------------
# Architecture: stored diffusers configs ⇄ networks built on the meta device
# ------------------------------------------------------------------------------------------------


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as JSON-able data (tuples → lists, private keys dropped)."""
    return json.loads(
        json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=list)
    )


def _module_configs(stage: Stage, model: nn.Module) -> dict[str, dict[str, Any]]:
    if stage == "tsdm":
        return {"unet": _plain(model.unet.config)}  # type: ignore[union-attr]
    unet, controlnet = model.unet, model.controlnet  # type: ignore[union-attr]
    return {"unet": _plain(unet.config), "controlnet": _plain(controlnet.config)}


def derived_configs(preset: ModelPreset, stage: Stage) -> dict[str, dict[str, Any]]:
    """The configs :func:`~consistent_avatar.models.build_tsdm` / ``build_fcsd`` would produce for
    ``preset`` (pretrained configs where it names directories), without loading any weights."""
    unet_path = preset.pretrained.resolve("unet")
    with torch.device("meta"):
        if unet_path is not None:
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_path))
        else:
            unet = UNet2DConditionModel(**preset.unet_kwargs())
        unet_cfg = _plain(unet.config)
        if stage == "tsdm":
            unet_cfg["in_channels"] = 2 * preset.latent_channels
            return {"unet": unet_cfg}
        cn_path = preset.pretrained.resolve("controlnet")
        if cn_path is not None:
            cn_cfg = _plain(ControlNetModel.load_config(cn_path))
            cn_cfg["conditioning_channels"] = CONTROL_CHANNELS
        else:
            controlnet = ControlNetModel.from_unet(
                unet,
                conditioning_channels=CONTROL_CHANNELS,
                conditioning_embedding_out_channels=preset.controlnet.conditioning_embedding_out_channels,
            )
            cn_cfg = _plain(controlnet.config)
    return {"unet": unet_cfg, "controlnet": cn_cfg}


def _meta_model(
    stage: Stage,
    preset: ModelPreset,
    configs: Mapping[str, Mapping[str, Any]],
    vae: AutoencoderKL,
    null_context: torch.Tensor,
) -> TSDM | FCSD:
    """The stage's network with every tensor but the (real, shared) VAE and null context on ``meta``."""
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(dict(configs["unet"]))
            if stage == "tsdm":
                return TSDM(preset, unet, vae, null_context)
            controlnet = ControlNetModel.from_config(dict(configs["controlnet"]))
            return FCSD(preset, unet, controlnet, vae, null_context)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConsistentAvatarError(
            f"the {stage} architecture config does not build a network: {exc}"
        ) from exc


def _weights_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(_SKIPPED_PREFIXES)}


def _fit_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
    return "; ".join(parts)


def _materialise(
    model: TSDM | FCSD,
    state: Mapping[str, torch.Tensor],
    null_context: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    where: str,
) -> TSDM | FCSD:
    """Allocate the meta parts of ``model`` on ``device`` in ``dtype`` and copy ``state`` in, strictly."""
    expected = _weights_state(model)
    problem = _fit_problems(expected, state)
    if problem is not None:
        raise ConsistentAvatarError(
            f"{where} does not fit the stored architecture: {problem}. The bundle is damaged or was "
            "assembled from mismatching files: export it again"
        )
    for name, child in model.named_children():
        if name == "vae":
            continue
        # nn.Module.to, not diffusers' ModelMixin.to: the latter warns about fp32-only modules, which
        # these networks do not have (their _keep_in_fp32_modules is empty).
        nn.Module.to(child, dtype=dtype)
        child.to_empty(device=device)
    full = dict(state)
    full[_NULL_KEY] = null_context
    result = model.load_state_dict(full, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("vae.")]
    if missing or result.unexpected_keys:  # pragma: no cover - excluded by _fit_problems
        raise ConsistentAvatarError(
            f"{where}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    # The only non-persistent state is each decoupled processor's 0-d ``scale``: set it, then make
    # sure nothing else was left uninitialised by to_empty.
    set_decoupled_scale(model, model.preset.conditioning.decoupled_scale)
    loaded = set(model.state_dict())
    for name, buf in model.named_buffers():
        if name not in loaded and not name.endswith(".scale"):
            raise RuntimeError(f"buffer {name} is not stored in bundles and would stay uninitialised")
    for name, proc in model.named_modules():
        if isinstance(proc, DecoupledCrossAttnProcessor) and proc.scale.is_meta:  # pragma: no cover
            raise RuntimeError(f"decoupled scale of {name} was not materialised")
    model.requires_grad_(False)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------
# Files and hashes
# ------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """A file's sha256, as ``bundle.json`` records it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata)
    )


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, OSError)
        raise ConsistentAvatarError(
            f"bundle file {path} is not a readable safetensors file ({exc}): "
            "export or download the bundle again"
        ) from exc


def _read_safetensors(
    path: Path, device: torch.device, keys: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of ``path`` (only ``keys`` if given) on ``device``; a damaged file is a clear error."""
    from safetensors import safe_open

    try:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if keys is None or k in keys:
                    out[k] = f.get_tensor(k)
        return out
    except Exception as exc:
        raise ConsistentAvatarError(
            f"bundle file {path} is not a readable safetensors file ({exc}): "
            "export or download the bundle again"
        ) from exc


def _load_state_source(source: WeightsSource, what: str) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ConsistentAvatarError(f"weights[{what!r}] maps {bad[0]!r} to a non-tensor")
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConsistentAvatarError(f"weights[{what!r}] = {str(path)!r} does not exist")
        return _read_safetensors(path, torch.device("cpu"))
    raise ConsistentAvatarError(
        f"weights[{what!r}] must be a TSDM/FCSD module, a state dict or a safetensors path, "
        f"got {type(source).__name__}"
    )


def versions() -> Versions:
    import diffusers
    import safetensors

    return Versions(
        package=__version__,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        safetensors=safetensors.__version__,
        python=_platform.python_version(),
    )


# ------------------------------------------------------------------------------------------------
# Where a bundle lives: local paths and pyarrow filesystem URIs
# ------------------------------------------------------------------------------------------------


def _filesystem(path_or_uri: str | os.PathLike[str], filesystem: Any = None) -> tuple[Any, str]:
    from pyarrow import fs as pafs

    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise ConsistentAvatarError(
                f"filesystem must be a pyarrow.fs.FileSystem, got {type(filesystem).__name__}"
            )
        return filesystem, str(path_or_uri)
    return resolve_filesystem(path_or_uri)


def _is_local(fs: Any) -> bool:
    from pyarrow import fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def default_cache_dir() -> Path:
    """``$CONSISTENT_AVATAR_CACHE/bundles``, else ``~/.cache/consistent_avatar/bundles``."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "consistent_avatar"
    return root / "bundles"


def bundle_cache_limit(cache_limit_bytes: float | None = None) -> int | None:
    """The size limit of the bundle cache in bytes; ``None`` means unlimited.

    ``cache_limit_bytes`` as given (a positive number of bytes; ``math.inf`` = unlimited), else
    ``$CONSISTENT_AVATAR_BUNDLE_CACHE_GB`` (GB of 1e9 bytes; ``inf`` or ``none`` = unlimited), else
    50 GB. Zero, a negative or an unreadable value is a :class:`ConsistentAvatarError` naming its source.
    """
    if cache_limit_bytes is not None:
        value = cache_limit_bytes
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
            raise ConsistentAvatarError(
                f"cache_limit_bytes must be a positive number of bytes (math.inf for no limit), got {value!r}"
            )
        return None if math.isinf(value) else max(1, int(value))
    text = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    if not text:
        return int(DEFAULT_CACHE_LIMIT_GB * 1e9)
    if text.lower() in ("none", "inf", "infinity", "+inf"):
        return None
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if math.isnan(gb) or gb <= 0:
        raise ConsistentAvatarError(
            f"{CACHE_LIMIT_ENV}={text!r}: give the bundle cache's size limit as a positive number of GB "
            "(1 GB = 1e9 bytes), or 'inf' / 'none' for no limit"
        )
    return None if math.isinf(gb) else max(1, int(gb * 1e9))


def _read_remote_bytes(fs: Any, path: str) -> bytes | None:
    from pyarrow import fs as pafs

    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


# ------------------------------------------------------------------------------------------------
# The bundle cache: entries, their locks, least-recently-used pruning
# ------------------------------------------------------------------------------------------------

#: ``<name>-<16 hex>``: the folder of one cached bundle version (anything else in the cache is not an entry)
_ENTRY_NAME = re.compile(r"[^.].*-[0-9a-f]{16}")
#: what ``staging_dir`` / ``publish_dir`` / the pruner leave beside an entry while they work on it
_WORK_NAME = re.compile(r"\..+\.(staging|old|trash)-[0-9a-f]{8}")
_PRUNE_LOCK = ".prune.lock"
#: a staging / replaced folder untouched this long belongs to a process that died
STALE_WORK_SECONDS = 24 * 3600


def cache_entry_lock_path(entry: Path) -> Path:
    """The lock file of the cache entry folder ``entry``: ``<cache>/<entry>.lock``, beside it (not inside,
    so the entry's own folder can be renamed away while the lock is held).

    A process reading the entry holds ``fcntl.flock(LOCK_SH)`` on it; the pruner deletes an entry only
    while it holds ``LOCK_EX`` (taken without waiting; an entry it cannot lock is skipped)."""
    return entry.parent / f"{entry.name}.lock"


def _flock(path: Path, operation: int) -> int | None:
    """An open descriptor of ``path`` (created if missing) holding the ``flock`` ``operation``; None when
    ``operation`` has ``LOCK_NB`` and another holder conflicts. A lock file that was deleted or replaced
    while this process waited (the pruner unlinks the lock files of the entries it removes) is opened
    again, so every holder locks the file that is at ``path`` now."""
    while True:
        # read-only: flock does not need write access, so a lock file another user created (0644
        # after their umask) still locks; a file this process creates is opened up to everyone
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            os.fchmod(fd, 0o666)
        except OSError:  # not ours: fine, see above
            pass
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:
                raise _LocksUnsupported(str(exc)) from exc
            raise
        except BaseException:
            os.close(fd)
            raise
        try:
            now, held = os.stat(path), os.fstat(fd)
            if (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


#: errno values of a filesystem without ``flock`` (some FUSE / SMB volumes)
_NO_FLOCK = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class _LocksUnsupported(OSError):
    """The cache's filesystem cannot ``flock``: loads go on unlocked and nothing is pruned."""


@contextlib.contextmanager
def _locked(path: Path, operation: int) -> Iterator[bool | None]:
    """``_flock`` as a context manager: yields whether the lock is held (always, without ``LOCK_NB``),
    or None when the filesystem has no ``flock`` (then nobody can prune safely: callers do not)."""
    try:
        fd = _flock(path, operation)
    except _LocksUnsupported as exc:
        log.warning("bundle cache %s: its filesystem cannot lock files (%s): bundles are loaded without "
                    "protection and the cache is not pruned; put CONSISTENT_AVATAR_CACHE on a local disk",
                    path.parent, exc)
        yield None
        return
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _newest_mtime(root: Path) -> float:
    newest = root.lstat().st_mtime
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _remove_stale_work(cache: Path) -> None:
    """Delete leftovers of killed processes: pruned (``.trash-``) folders, whatever their age (only a
    pruner, under ``.prune.lock`` as the caller is, creates and removes them), and staging and replaced
    (``publish_dir``'s ``.old-``) folders that nothing has touched for :data:`STALE_WORK_SECONDS`. A
    younger staging folder may be another process's download in progress and is left alone."""
    cutoff = time.time() - STALE_WORK_SECONDS
    for p in cache.iterdir():
        match = _WORK_NAME.fullmatch(p.name)
        if match is None or not p.is_dir() or p.is_symlink():
            continue
        try:
            if match.group(1) == "trash" or _newest_mtime(p) < cutoff:
                shutil.rmtree(p, ignore_errors=True)
                log.info("bundle cache %s: removed %s, left by a process that died a day ago", cache, p.name)
        except FileNotFoundError:
            pass


def _prune_cache(cache: Path, limit: int | None, keep: Path, incoming: int = 0) -> None:
    """Delete least-recently-used entries of ``cache`` until its entries total at most ``limit`` bytes.

    ``incoming``: the size of a download about to start (``keep`` not yet in the cache): room is made
    for it first, so the cache stays within the limit during the download too; warnings are left to
    the pass after it.

    ``keep`` (the entry just fetched, whose lock the caller holds) is never deleted. An entry whose lock
    another process holds (it is loading from it) is skipped. Deleting renames the entry to a
    ``.trash-`` name first (under its exclusive lock), so a half-deleted folder is never taken for a
    bundle, then removes it and its lock file. One process prunes a cache at a time (``.prune.lock``)."""
    with _locked(cache / _PRUNE_LOCK, fcntl.LOCK_EX) as can_prune:
        if not can_prune:
            return  # no flock on this filesystem: deleting could pull a bundle from under a reader
        _remove_stale_work(cache)  # also with no limit: a killed download is a bundle's size of garbage
        if limit is None:
            return
        entries: list[tuple[float, str, Path, int]] = []
        for p in cache.iterdir():
            if _ENTRY_NAME.fullmatch(p.name) is None or p.is_symlink() or not p.is_dir():
                continue
            if not (p / MANIFEST_FILE).is_file():  # not a bundle this cache published: never ours to delete
                continue
            try:
                entries.append((p.stat().st_mtime, p.name, p, _tree_bytes(p)))
            except FileNotFoundError:
                continue
        total = sum(size for *_, size in entries)
        kept_bytes = next((size for _, _, p, size in entries if p == keep), 0)
        pruned: list[str] = []
        freed = 0
        in_use: list[str] = []
        for _, name, entry, size in sorted(entries):  # least recently used first
            if total + incoming <= limit:
                break
            if entry == keep:
                continue
            lock = cache_entry_lock_path(entry)
            with _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
                if not held:
                    in_use.append(name)
                    continue
                trash = cache / f".{name}.trash-{uuid.uuid4().hex[:8]}"
                try:
                    os.replace(entry, trash)
                except FileNotFoundError:  # removed meanwhile by hand
                    total -= size
                    continue
                except OSError as exc:  # e.g. another user's folder in a shared cache: not ours to delete
                    in_use.append(f"{name} ({exc.strerror or exc})")
                    continue
                with contextlib.suppress(OSError):
                    lock.unlink(missing_ok=True)  # while held: a waiter re-opens a fresh one (see _flock)
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            freed += size
            pruned.append(name)
        # lock files of entries that are gone (a failed download, a folder deleted by hand)
        for p in cache.glob("*.lock"):
            entry = cache / p.name[: -len(".lock")]
            if _ENTRY_NAME.fullmatch(entry.name) is None or entry.exists():
                continue
            with _locked(p, fcntl.LOCK_EX | fcntl.LOCK_NB) as held, contextlib.suppress(OSError):
                if held and not entry.exists():
                    p.unlink(missing_ok=True)
    if pruned:
        log.info(
            "bundle cache %s: pruned %d least recently used bundle(s) (%s), freed %s; it holds %s (limit %s)",
            cache, len(pruned), ", ".join(pruned), _gb(freed), _gb(total), _gb(limit),
        )
    if incoming:
        return  # the pass after the download warns, if the cache is still over its limit then
    if kept_bytes > limit:
        log.warning(
            "bundle cache %s: its limit, %s (cache_limit_bytes or $%s), is smaller than one bundle: %s "
            "holds %s. It is kept (the bundle in use is never pruned), but every fetch now evicts the "
            "bundles before it: raise the limit",
            cache, _gb(limit), CACHE_LIMIT_ENV, keep.name, _gb(kept_bytes),
        )
    elif total > limit:
        log.warning(
            "bundle cache %s: it holds %s, over its %s limit: %s could not be pruned (being loaded by other "
            "processes, or not deletable by this one)",
            cache, _gb(total), _gb(limit), ", ".join(in_use) or "the other entries",
        )


def _manifest_bytes(manifest: bytes) -> int:
    """The total size of a bundle's files as its ``bundle.json`` lists them (0 when it cannot be read:
    the bundle is then refused when loaded)."""
    try:
        files = json.loads(manifest).get("files") or {}
        return sum(int(entry.get("bytes", 0)) for entry in files.values())
    except (ValueError, TypeError, AttributeError):
        return 0


@contextlib.contextmanager
def _fetch(fs: Any, path: str, uri: str, cache_dir: Path | None, limit: int | None) -> Iterator[Path]:
    """Copy a bundle from a non-local filesystem into the cache (atomically), or reuse the cached copy;
    yields the cached folder, locked against pruning until the ``with`` block ends.

    Each version of a bundle gets its own cache folder ``<name>-<16 hex>``; a changed bundle is
    downloaded into a new folder and the earlier version stays until pruned. The caller's process holds
    a shared ``flock`` on ``<cache>/<entry>.lock`` (:func:`cache_entry_lock_path`) from before the cached
    copy is checked until the block ends. Before a download the cache makes room for the bundle's size
    (from its ``bundle.json``). Once the entry is published or reused, its folder's mtime is set
    to now (its last use) and the cache is pruned to ``limit`` bytes (:func:`bundle_cache_limit`; None:
    unlimited): least recently used entries first, skipping entries another process holds locked and
    never this one (if it alone exceeds the limit it is kept, with a warning). Other processes' staging
    folders (downloads in progress) are neither counted nor touched, unless nothing has written to
    them for a day (:data:`STALE_WORK_SECONDS`): then they are leftovers of a killed process and removed
    (as are a killed pruner's ``.trash-`` folders, at once). The cache may therefore exceed the limit by
    other processes' downloads in progress."""
    from pyarrow import fs as pafs

    manifest = _read_remote_bytes(fs, f"{path.rstrip('/')}/{MANIFEST_FILE}")
    if manifest is None:
        raise ConsistentAvatarError(
            f"no bundle at {uri}: {MANIFEST_FILE} is missing (an incomplete upload, or the wrong path)"
        )
    cache = (cache_dir or default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    # The cache folder is named by the source *and* its manifest (which lists every file's hash), so
    # a cached copy is never replaced while another process (a Ray Data pool actor on the same node)
    # may be reading it: a changed bundle gets a new folder, and an identical one downloaded twice
    # concurrently is published once.
    key = hashlib.sha256(f"{fs.type_name}:{path}".encode() + b"\0" + manifest).hexdigest()[:16]
    final = cache / f"{Path(path.rstrip('/')).name or 'bundle'}-{key}"
    cached = final / MANIFEST_FILE
    with _locked(cache_entry_lock_path(final), fcntl.LOCK_SH):
        if cached.is_file() and cached.read_bytes() == manifest:
            log.info("bundle %s: using the cached copy %s", uri, final)
        else:
            _prune_cache(cache, limit, keep=final, incoming=_manifest_bytes(manifest))  # room first
            staged = staging_dir(final)
            try:
                pafs.copy_files(
                    path, str(staged), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
                )
                if (staged / MANIFEST_FILE).read_bytes() != manifest:
                    raise ConsistentAvatarError(
                        f"the bundle at {uri} changed while it was downloaded: load it again"
                    )
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            if cached.is_file() and cached.read_bytes() == manifest:  # another process published it meanwhile
                shutil.rmtree(staged, ignore_errors=True)
            else:
                publish_dir(staged, final)
                log.info("bundle %s downloaded to %s", uri, final)
        try:
            os.utime(final)  # its last use, for the least-recently-used order
        except PermissionError:  # a shared cache folder of another user: its order stays as it was
            log.debug("bundle cache: cannot record the use of %s", final)
        _prune_cache(cache, limit, keep=final)
        yield final


# ------------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------------


def read_manifest(root: str | os.PathLike[str]) -> BundleManifest:
    """The manifest of the local bundle ``root``, refused if of another schema version."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise ConsistentAvatarError(f"bundle {root} does not exist (export one with `cavatar train`)")
    if not path.is_file():
        raise ConsistentAvatarError(
            f"{root} holds no {MANIFEST_FILE}: it is not an actor bundle, or an export that did not finish "
            "(export it again)"
        )
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConsistentAvatarError(f"{path} is not valid JSON ({exc}): export the bundle again") from exc
    if not isinstance(data, dict):
        raise ConsistentAvatarError(f"{path} must hold a JSON object: export the bundle again")
    version = data.get("schema_version")
    written_by = (data.get("versions") or {}).get("package", "an unknown version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConsistentAvatarError(f"{path} has no integer schema_version: export the bundle again")
    if version < BUNDLE_SCHEMA_VERSION:
        raise ConsistentAvatarError(
            f"bundle {root} has schema version {version} (written by consistent_avatar {written_by}); this "
            f"consistent_avatar {__version__} reads version {BUNDLE_SCHEMA_VERSION}: export the actor again "
            "with this version (`cavatar train` re-exports finished actors), or load it with the version "
            "that wrote it"
        )
    if version > BUNDLE_SCHEMA_VERSION:
        raise ConsistentAvatarError(
            f"bundle {root} has schema version {version} (written by consistent_avatar {written_by}), newer "
            f"than this consistent_avatar {__version__} reads ({BUNDLE_SCHEMA_VERSION}): upgrade "
            f"consistent_avatar to {written_by} or later"
        )
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ConsistentAvatarError(f"{path} is invalid ({problems}): export the bundle again") from None


def _check_files(root: Path, manifest: BundleManifest, needed: Sequence[str], verify: bool) -> None:
    for rel in needed:
        entry = manifest.files.get(rel)
        if entry is None:
            raise ConsistentAvatarError(
                f"bundle {root}: {MANIFEST_FILE} does not list {rel}: export it again"
            )
        path = root / rel
        if not path.is_file():
            raise ConsistentAvatarError(
                f"bundle {root} is missing {rel}: the copy is incomplete; export or download it again"
            )
        size = path.stat().st_size
        if size != entry.bytes:
            raise ConsistentAvatarError(
                f"bundle file {path} has {size} bytes, the manifest says {entry.bytes}: it is truncated or "
                "was replaced; export or download the bundle again"
            )
        if verify and file_sha256(path) != entry.sha256:
            raise ConsistentAvatarError(
                f"bundle file {path} is corrupt (sha256 differs from the manifest): export or download the "
                "bundle again"
            )


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------


def _as_vae(vae: AutoencoderKL | str | os.PathLike[str]) -> AutoencoderKL:
    if isinstance(vae, AutoencoderKL):
        return vae
    path = Path(vae)
    if not (path / CONFIG_FILE).is_file():
        raise ConsistentAvatarError(
            f"vae = {str(path)!r} is not a diffusers AutoencoderKL directory (no config.json)"
        )
    try:
        return AutoencoderKL.from_pretrained(path, **LOCAL_LOAD)
    except (OSError, ValueError) as exc:
        raise ConsistentAvatarError(f"cannot load the VAE at {path}: {exc}") from exc


def _check_vae(vae: AutoencoderKL, preset: ModelPreset) -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != preset.vae.scale_factor or vae.config.latent_channels != preset.latent_channels:
        raise ConsistentAvatarError(
            f"the VAE has scale factor {factor} and {vae.config.latent_channels} latent channels; preset "
            f"{preset.name!r} needs {preset.vae.scale_factor} and {preset.latent_channels}"
        )


def _lcm_for(lcm: LCMDistillConfig | Mapping[str, Any] | None, stage: Stage) -> LCMDistillConfig | None:
    if lcm is None:
        return None
    if isinstance(lcm, LCMDistillConfig):
        return lcm
    if isinstance(lcm, Mapping) and set(lcm) <= set(STAGES) | {f"lcm_{s}" for s in STAGES}:
        value = lcm.get(stage, lcm.get(f"lcm_{stage}"))
        if value is None or isinstance(value, LCMDistillConfig):
            return value
        return LCMDistillConfig.parse(value)
    return LCMDistillConfig.parse(lcm)  # one config as a mapping, for both stages


def save_bundle(
    path: str | os.PathLike[str],
    *,
    actor: str,
    preset: ModelPreset,
    weights: Mapping[str, WeightsSource],
    emotion_labels: Sequence[str],
    emotion_table: np.ndarray | torch.Tensor,
    vae: AutoencoderKL | str | os.PathLike[str] | None = None,
    lcm: LCMDistillConfig | Mapping[str, Any] | None = None,
    sampling: SamplingDefaults | Mapping[str, Any] | None = None,
    tsd: TSDConfig | None = None,
    refiner: RefinerReference | str | os.PathLike[str] | None = None,
    training: Mapping[str, Any] | None = None,
    seed: int = 0,
    filesystem: Any = None,
) -> str:
    """Write the bundle of ``actor`` to ``path`` (local path or pyarrow URI) and return where it is.

    ``weights`` maps training stage names to what each stage produced: ``tsdm`` and ``fcsd`` (the
    teachers), ``lcm_tsdm`` and ``lcm_fcsd`` (the students); each value is the model itself
    (:class:`TSDM` / :class:`FCSD`), its state dict, or a safetensors file of it. ``vae.*`` keys are
    ignored (the VAE is stored once). Each stage needs at least one variant. Architecture configs come
    from a module when one is given, else from the preset (:func:`derived_configs`); the weights must
    fit them. ``vae``: the VAE object or a diffusers directory; by default the VAE of a given module,
    else the preset's (pretrained, or random init with ``seed`` — what the trainer built); the
    null context likewise comes from the weights (``null_context.context``) or the preset and ``seed``.
    ``lcm``: the distillation config of the students (one for both stages, or per stage).

    Local targets are assembled in a hidden directory beside ``path`` and renamed into place, so a
    reader never sees a partial bundle; a remote target gets every file uploaded before
    ``bundle.json``.
    """
    if not isinstance(preset, ModelPreset):
        raise ConsistentAvatarError(f"preset must be a ModelPreset, got {type(preset).__name__}")
    if not isinstance(actor, str) or not actor or "/" in actor:
        raise ConsistentAvatarError(f"actor must be a non-empty name without '/', got {actor!r}")
    unknown = sorted(set(weights) - set(WEIGHT_KEYS))
    if unknown:
        raise ConsistentAvatarError(f"unknown weights {unknown}: use the stage names {sorted(WEIGHT_KEYS)}")
    if isinstance(emotion_table, torch.Tensor):
        table = emotion_table.detach().cpu().float()
    else:
        table = torch.as_tensor(np.asarray(emotion_table, dtype=np.float32))
    emotions = EmotionTable(tuple(emotion_labels), table)
    if emotions.dim != preset.conditioning.emotion_dim:
        raise ConsistentAvatarError(
            f"emotion embeddings have {emotions.dim} dims, preset {preset.name!r} takes "
            f"{preset.conditioning.emotion_dim}"
        )
    if sampling is None:
        sampling = SamplingDefaults()
    elif not isinstance(sampling, SamplingDefaults):
        try:
            sampling = SamplingDefaults.model_validate(dict(sampling))
        except ValidationError as exc:
            raise ConsistentAvatarError(f"invalid sampling defaults: {exc}") from None
    if isinstance(refiner, (str, os.PathLike)):
        refiner = RefinerReference(path=os.fspath(refiner))

    modules: dict[str, nn.Module] = {k: v for k, v in weights.items() if isinstance(v, nn.Module)}
    for key, module in modules.items():
        stage = WEIGHT_KEYS[key][0]
        if not isinstance(module, TSDM if stage == "tsdm" else FCSD):
            raise ConsistentAvatarError(
                f"weights[{key!r}] is a {type(module).__name__}; stage {stage} needs a "
                f"{'TSDM' if stage == 'tsdm' else 'FCSD'}"
            )
    for stage in STAGES:
        if not any(WEIGHT_KEYS[k][0] == stage for k in weights):
            raise ConsistentAvatarError(
                f"weights has nothing for stage {stage}: give {stage!r} (teacher) and/or "
                f"'lcm_{stage}' (student)"
            )
    if vae is None:
        vae_obj = next((m.vae for m in modules.values()), None)
        if vae_obj is None:
            vae_obj, _ = load_vae(preset, seed=seed)
    else:
        vae_obj = _as_vae(vae)
    _check_vae(vae_obj, preset)

    fs, target = _filesystem(path, filesystem)
    local = _is_local(fs)
    final = Path(target) if local else None
    if final is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_dir(final)
    else:
        staged = Path(tempfile.mkdtemp(prefix=".bundle-upload-"))
    try:
        _write_contents(
            staged,
            actor=actor,
            preset=preset,
            weights=weights,
            modules=modules,
            emotions=emotions,
            vae=vae_obj,
            lcm=lcm,
            sampling=sampling,
            tsd=tsd or TSDConfig(),
            refiner=refiner,
            training=training,
            seed=seed,
        )
        if final is not None:
            publish_dir(staged, final)
            log.info("bundle of actor %r written to %s", actor, final)
            return str(final)
        _upload(staged, fs, target)
        log.info("bundle of actor %r uploaded to %s", actor, os.fspath(path))
        return os.fspath(path)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def _upload(staged: Path, fs: Any, target: str) -> None:
    """Replace the remote copy: old contents removed, every file uploaded, the manifest last (object
    stores have no atomic directory rename; a reader polling for bundle.json never sees a partial
    bundle, only none while the upload runs)."""
    from pyarrow import fs as pafs

    target = target.rstrip("/")
    fs.create_dir(target, recursive=True)
    fs.delete_dir_contents(target, missing_dir_ok=True)  # manifest included: an old version disappears
    files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    for p in [*files, staged / MANIFEST_FILE]:
        rel = p.relative_to(staged).as_posix()
        if "/" in rel:
            fs.create_dir(f"{target}/{rel.rsplit('/', 1)[0]}", recursive=True)
        pafs.copy_files(
            str(p), f"{target}/{rel}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )


def _write_contents(
    root: Path,
    *,
    actor: str,
    preset: ModelPreset,
    weights: Mapping[str, WeightsSource],
    modules: Mapping[str, nn.Module],
    emotions: EmotionTable,
    vae: AutoencoderKL,
    lcm: LCMDistillConfig | Mapping[str, Any] | None,
    sampling: SamplingDefaults,
    tsd: TSDConfig,
    refiner: RefinerReference | None,
    training: Mapping[str, Any] | None,
    seed: int,
) -> None:
    atomic_write_json(root / PRESET_FILE, preset.model_dump(mode="json"))
    emotions.write(root / EMOTIONS_FILE)
    vae.save_pretrained(root / VAE_DIR, safe_serialization=True)
    vae_identity = model_identity(vae)  # by content: what `cavatar prepare --vae` records of its VAE
    if training is not None:
        atomic_write_bytes(
            root / TRAINING_FILE,
            (json.dumps(dict(training), indent=2, sort_keys=True, default=str) + "\n").encode(),
        )

    null_context: torch.Tensor | None = None
    null_from = ""
    stages: dict[str, StageEntry] = {}
    sources: dict[str, str] = {}
    for stage in STAGES:
        keys = {variant: key for key, (s, variant) in WEIGHT_KEYS.items() if s == stage and key in weights}
        stage_modules = [modules[k] for k in keys.values() if k in modules]
        configs = (
            _module_configs(stage, stage_modules[0]) if stage_modules else derived_configs(preset, stage)
        )
        for m in stage_modules:
            if _module_configs(stage, m) != configs:
                raise ConsistentAvatarError(f"the {stage} teacher and student have different architectures")
            sources.update({f"{stage}.{k}": str(v) for k, v in getattr(m, "sources", {}).items()})
        with torch.device("meta"):
            meta_null = torch.empty(preset.conditioning.null_context_tokens, preset.unet.cross_attention_dim)
        expected = _weights_state(_meta_model(stage, preset, configs, vae, meta_null))
        states: dict[Variant, dict[str, torch.Tensor]] = {}
        for variant, key in keys.items():
            full = _load_state_source(weights[key], key)
            ctx = full.get(_NULL_KEY)
            if ctx is not None:
                ctx = ctx.detach().float().cpu()
                if null_context is None:
                    null_context, null_from = ctx, key
                elif ctx.shape != null_context.shape or not torch.equal(ctx, null_context):
                    raise ConsistentAvatarError(
                        f"weights[{key!r}] and weights[{null_from!r}] hold different null contexts: "
                        "they were not "
                        "built from the same shared components (load_shared_components)"
                    )
            state = {
                k: (v.detach().float() if v.is_floating_point() else v.detach())
                for k, v in full.items()
                if not k.startswith(_SKIPPED_PREFIXES)
            }
            problem = _fit_problems(expected, state)
            if problem is not None:
                raise ConsistentAvatarError(
                    f"weights[{key!r}] do not fit the {stage} architecture of preset {preset.name!r}: "
                    f"{problem} "
                    "(trained with another preset, or the wrong file?)"
                )
            states[variant] = state
        (root / stage).mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / stage / CONFIG_FILE, configs)
        entries: dict[Variant, VariantEntry] = {}
        for variant, state in states.items():
            own = state
            base: Literal["teacher"] | None = None
            if variant == "lcm" and "teacher" in states:
                teacher = states["teacher"]
                own = {
                    k: v
                    for k, v in state.items()
                    if not (v.dtype == teacher[k].dtype and torch.equal(v.cpu(), teacher[k].cpu()))
                }
                base = "teacher"
            rel = f"{stage}/{variant}.safetensors"
            _save_safetensors(
                own,
                root / rel,
                {
                    "format": "pt",
                    "consistent_avatar.schema_version": str(BUNDLE_SCHEMA_VERSION),
                    "stage": stage,
                    "variant": variant,
                    "base": base or "",
                },
            )
            entries[variant] = VariantEntry(file=rel, base=base, tensors=len(state))
            log.info("%s/%s: %d tensors (%d stored)", stage, variant, len(state), len(own))
        stages[stage] = StageEntry(
            config=f"{stage}/{CONFIG_FILE}",
            variants=entries,
            lcm=(_lcm_for(lcm, stage) or LCMDistillConfig()) if "lcm" in entries else None,
        )
    if null_context is None:  # rebuilt exactly as the trainer built it: from the preset and seed
        null_context = load_shared_components(preset, seed=seed).null_context.float()
    _save_safetensors({"context": null_context}, root / NULL_CONTEXT_FILE, {"format": "pt"})

    for p in root.rglob("*"):  # safetensors writes 0600; a bundle is read by other users (serve, render)
        if p.is_file():
            p.chmod(0o644)
    files = {
        p.relative_to(root).as_posix(): FileEntry(sha256=file_sha256(p), bytes=p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = BundleManifest(
        schema_version=BUNDLE_SCHEMA_VERSION,
        actor=actor,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=versions(),
        stages=stages,  # type: ignore[arg-type]
        sampling=sampling,
        tsd=tsd,
        refiner=refiner,
        emotions=len(emotions.labels),
        sources=sources,
        files=files,
        vae_identity=vae_identity,
    )
    atomic_write_json(root / MANIFEST_FILE, manifest.model_dump(mode="json"))  # last


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked_bundle(
    path_or_uri: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    filesystem: Any = None,
    cache_limit_bytes: float | None = None,
) -> Iterator[Path]:
    """The local directory of a bundle, usable until the ``with`` block ends: itself if local, else a
    cached download of it, which no process prunes from the cache while the block runs.

    ``cache_dir``: the cache folder (default :func:`default_cache_dir`); ``cache_limit_bytes``: its size
    limit (default :func:`bundle_cache_limit`: ``$CONSISTENT_AVATAR_BUNDLE_CACHE_GB``, else 50 GB;
    ``math.inf``: unlimited). See :func:`_fetch` for how the cache is kept within it."""
    fs, path = _filesystem(path_or_uri, filesystem)
    if _is_local(fs):
        yield Path(path)
        return
    limit = bundle_cache_limit(cache_limit_bytes)
    cache = Path(cache_dir) if cache_dir is not None else None
    with _fetch(fs, path, os.fspath(path_or_uri), cache, limit) as root:
        yield root


def locate_bundle(
    path_or_uri: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    filesystem: Any = None,
    cache_limit_bytes: float | None = None,
) -> Path:
    """The local directory of a bundle: itself if local, else a cached download of it.

    A cached download is no longer protected once this returns: another process pruning the cache (see
    :func:`locked_bundle`, whose arguments these are) may delete it. Read it inside
    ``with locked_bundle(...)`` instead, as :func:`load_bundle` does."""
    with locked_bundle(
        path_or_uri, cache_dir=cache_dir, filesystem=filesystem, cache_limit_bytes=cache_limit_bytes
    ) as root:
        return root


def load_bundle(
    path_or_uri: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    variants: Sequence[Variant] | None = None,
    verify: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    filesystem: Any = None,
    cache_limit_bytes: float | None = None,
) -> ActorBundle:
    """Load a bundle's networks onto ``device`` in ``dtype`` (e.g. bf16 on GPU).

    ``variants``: which of ``teacher`` / ``lcm`` to load (default: all stored); a serve replica that
    only samples with LCM passes ``("lcm",)`` and holds half the weights. ``verify`` checks every
    file's sha256 against the manifest.

    A bundle on a non-local filesystem is downloaded into ``cache_dir`` (default
    :func:`default_cache_dir`), which is kept within ``cache_limit_bytes`` (default
    ``$CONSISTENT_AVATAR_BUNDLE_CACHE_GB``, else 50 GB; ``math.inf``: unlimited) by deleting the least
    recently used bundles. The cached copy is locked against that pruning until every file has been
    read; the returned bundle's ``root`` may be pruned afterwards (the weights are in memory by then).
    """
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConsistentAvatarError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with locked_bundle(
        path_or_uri, cache_dir=cache_dir, filesystem=filesystem, cache_limit_bytes=cache_limit_bytes
    ) as root:
        return _load_from(root, os.fspath(path_or_uri), device, dtype, variants, verify)


def _load_from(
    root: Path,
    uri: str,
    device: torch.device,
    dtype: torch.dtype,
    variants: Sequence[Variant] | None,
    verify: bool,
) -> ActorBundle:
    """:func:`load_bundle` of the local directory ``root`` (``uri``: where it came from)."""
    manifest = read_manifest(root)
    wanted: tuple[Variant, ...]
    if variants is None:
        wanted = VARIANTS
    else:
        wanted = tuple(variants)
        bad = [v for v in wanted if v not in VARIANTS]
        if bad or not wanted:
            raise ConsistentAvatarError(
                f"variants must be a non-empty subset of {list(VARIANTS)}, got {list(wanted)}"
            )
    missing_stages = [s for s in STAGES if s not in manifest.stages]
    if missing_stages:
        raise ConsistentAvatarError(f"bundle {root} lacks stage(s) {missing_stages}: export it again")
    plan: dict[Stage, list[Variant]] = {}
    for stage in STAGES:
        stored = manifest.stages[stage].variants
        chosen = [v for v in wanted if v in stored]
        if variants is not None and len(chosen) != len(wanted):
            absent = [v for v in wanted if v not in stored]
            raise ConsistentAvatarError(
                f"bundle {root} has no {absent} weights for {stage} (it holds {sorted(stored)})"
            )
        if not chosen:
            raise ConsistentAvatarError(f"bundle {root} holds no weights for {stage}: export it again")
        plan[stage] = chosen

    needed = [
        PRESET_FILE,
        EMOTIONS_FILE,
        NULL_CONTEXT_FILE,
        *(r for r in manifest.files if r.startswith(f"{VAE_DIR}/")),
    ]
    for stage, chosen in plan.items():
        entry = manifest.stages[stage]
        needed.append(entry.config)
        for v in chosen:
            needed.append(entry.variants[v].file)
            if entry.variants[v].base is not None:
                needed.append(entry.variants[entry.variants[v].base].file)
    needed = list(dict.fromkeys(needed))
    _check_files(root, manifest, needed, verify)

    try:
        preset = parse_preset(read_json(root / PRESET_FILE))
    except json.JSONDecodeError as exc:
        raise ConsistentAvatarError(f"bundle {root}: {PRESET_FILE} is not valid JSON: {exc}") from exc
    # Pretrained directories are provenance only: every weight comes from the bundle.
    preset = preset.model_copy(update={"pretrained": type(preset.pretrained)()})
    emotions = EmotionTable.read(root / EMOTIONS_FILE)
    if emotions.dim != preset.conditioning.emotion_dim:
        raise ConsistentAvatarError(
            f"bundle {root}: emotion embeddings have {emotions.dim} dims, the preset takes "
            f"{preset.conditioning.emotion_dim}: export it again"
        )
    try:
        vae = AutoencoderKL.from_pretrained(root / VAE_DIR, **{**LOCAL_LOAD, "torch_dtype": dtype})
    except (OSError, ValueError) as exc:
        raise ConsistentAvatarError(
            f"bundle {root}: the VAE in {VAE_DIR}/ does not load ({exc}): export it again"
        ) from exc
    _check_vae(vae, preset)
    vae = freeze(vae.to(device))  # type: ignore[assignment]
    null = _read_safetensors(root / NULL_CONTEXT_FILE, torch.device("cpu")).get("context")
    if null is None or null.shape != (
        preset.conditioning.null_context_tokens,
        preset.unet.cross_attention_dim,
    ):
        raise ConsistentAvatarError(
            f"bundle {root}: {NULL_CONTEXT_FILE} does not hold the preset's null context"
        )

    models: dict[Stage, dict[Variant, Any]] = {"tsdm": {}, "fcsd": {}}
    cpu = torch.device("cpu")
    for stage, chosen in plan.items():
        entry = manifest.stages[stage]
        try:
            configs = read_json(root / entry.config)
        except json.JSONDecodeError as exc:
            raise ConsistentAvatarError(f"bundle {root}: {entry.config} is not valid JSON: {exc}") from exc
        for variant in chosen:
            ventry = entry.variants[variant]
            # Read on the CPU; load_state_dict copies (and casts) into the tensors allocated on device.
            state = _read_safetensors(root / ventry.file, cpu)
            if ventry.base is not None:
                base_file = root / entry.variants[ventry.base].file
                rest = set(_safetensors_keys(base_file)) - set(state)
                state.update(_read_safetensors(base_file, cpu, rest))
            model = _meta_model(stage, preset, configs, vae, null)
            models[stage][variant] = _materialise(model, state, null, device, dtype, f"{root / ventry.file}")
            del state
    training = None
    if (root / TRAINING_FILE).is_file():
        training = read_json(root / TRAINING_FILE)
    log.info("bundle %s (actor %r) loaded: %s on %s, %s", root, manifest.actor, plan, device, dtype)
    return ActorBundle(
        root=root,
        uri=uri,
        manifest=manifest,
        preset=preset,
        emotions=emotions.to(device=device, dtype=dtype),
        vae=vae,
        tsdm=models["tsdm"],
        fcsd=models["fcsd"],
        device=device,
        dtype=dtype,
        training=training,
    )
