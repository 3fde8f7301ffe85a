"""The render pipeline: stage-1 render + FLAME parameters + emotion → frame (paper Fig. 2, stages 2–3).

For a batch of B frames, all at once (no per-frame Python loop around a network)::

    coarse TSD   = temporally_sensitive_detail(coarse_rgb)                 FFT high-pass, [-1, 1]
    stage 2      z_coarse = VAE.encode(coarse TSD)                           VAE encode  #1
                 f_c      = [E(coarse TSD), W_P P, W_E E]
                 x_0      = sample(TSDM, noise, f_c, z_coarse)               LCM / DDIM / DPM loop
                 aligned TSD = VAE.decode(x_0)                               VAE decode  #1
    stage 3      f_d = [E(aligned TSD), W_P P, W_E E, W_T T],  z_c = [normal, aligned TSD]
                 x_0 = sample(FCSD, noise, f_d, ControlNet(z_c))
                 frame = VAE.decode(x_0)                                     VAE decode  #2
    (optional)   frame = SDXL refiner img2img(frame)

Where the VAE runs, and why no more: the coarse TSD is encoded once, because TSDM takes it as a
spatial latent beside x_t (not at all when the caller passes that latent, ``coarse_latent=``: shards
prepared with the bundle's VAE hold it); stage 2's result is decoded once, because the ControlNet condition z_c
and f_d's TSD code are defined on the TSD *image* (paper eq. 8); the frame latent is decoded once.
Nothing else crosses the VAE (the baseline skips the encode and the first decode). The refiner
has its own VAE (SDXL's latent space is not SD 1.5's; see :mod:`.models.refiner`).

Ablations (the rows of the paper's Tables 1 and 2), as inference-time switches on one trained
bundle — the paper trains a separate model per row; these switches remove the same information
from the full model's inputs:

- ``baseline`` ("w/o stage 2", "w/o aligned TSD"): stage 2 is skipped; the raw coarse TSD goes to
  the ControlNet (z_c) and to f_d's TSD code. No VAE encode, one decode.
- ``without_normal`` ("w/o normal"): the normal half of z_c is all zeros — in the [-1, 1] encoding
  that is the flat mid-grey map (8-bit 127.5), "no normal", not a valid unit normal. The TSD half
  of z_c is unchanged. ``coarse_normal`` may then be None.
- ``without_emotion`` ("w/o emotion text"): f_d's emotion token (row 3) is set to zero. A zero
  token has a zero key and value in every decoupled cross-attention layer, so no emotion
  information — neither the label's embedding T nor the projection's learned bias — reaches the
  networks (it still holds its share of the softmax at logit 0; dropping it would change f_d's
  shape, which the trained layers are not built for). ``emotion`` may then be None.
- ``without_lcm`` ("w/o LCM"): the teacher ε-models sampled with DDIM (or DPM-Solver++) and the
  bundle's teacher step count (default 25) instead of the LCM students in a few steps.

Determinism: noise comes only from the given ``seed`` / ``generator``. A seed seeds a generator on
the pipeline's device, so on a GPU the noise — the initial latents and the noise LCM injects between
steps — is drawn there without a CPU–GPU synchronisation (a CPU generator's draw is a blocking copy,
one per step); the same seed therefore gives different noise on a CPU and on a GPU. Pass CPU
``generator`` objects for noise that is the same on every device (at that cost). A list of
per-frame seeds or generators makes each frame's noise independent of how frames are batched. On
CPU, equal inputs and seeds give equal outputs bit for bit.

Synchronisation: between its input checks and its end a call does not wait for the GPU — phase
timings are CUDA events and the stages' finiteness checks are device flags, all read after the one
final synchronisation; the sampling loops and the VAE passes only queue work (see
:mod:`.models.sampling`), so a compiled pipeline's CUDA graphs run back to back. (The refiner, a
diffusers SDXL pipeline, synchronises on its own.)

Compile-friendliness: inside the sampling loops every network call is a pure function of tensors
with static shapes (condition tokens via ``cross_attention_kwargs``, no Python state mutated per
step), so :meth:`ConsistentAvatarPipeline.compile` can wrap the UNets and the ControlNet with
``torch.compile`` (CUDA graphs with ``mode="reduce-overhead"``). A pipeline is not re-entrant: its
schedulers hold per-call state; use one pipeline per thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .bundle import (
    STAGES,
    VARIANTS,
    ActorBundle,
    EmotionTable,
    SamplingDefaults,
    Stage,
    Variant,
    load_bundle,
)
from .data.layout import EXPRESSION_DIM, POSE_DIM
from .errors import ConsistentAvatarError
from .models.components import vae_decode, vae_encode
from .models.fcsd import FCSD
from .models.lcm import LCMDistillConfig
from .models.presets import ModelPreset
from .models.refiner import Refiner
from .models.sampling import SchedulerKind, inference_scheduler, sample, set_steps
from .models.tsdm import TSDM
from .tsd import TSDConfig, temporally_sensitive_detail

log = logging.getLogger(__name__)

#: f_d = [TSD code, pose, expression, emotion]: the row ``without_emotion`` zeroes
EMOTION_TOKEN = 3
_RANGE_TOLERANCE = 1e-3


@dataclass
class PipelineOutput:
    """What one call renders.

    ``frames``: (B, 3, H, W) float32 in [0, 1] on the pipeline's device. ``timings``: seconds per
    phase (``tsd``, ``stage2`` incl. its VAE encode/decode, ``stage3`` incl. the decode,
    ``refiner``, ``total``), CUDA-event times on a GPU (``total``: host wall clock). ``settings``: the sampler,
    steps, variant and switches actually used. With ``return_intermediates``: ``coarse_tsd`` and
    ``aligned_tsd`` (B, 3, H, W) in the VAE-normalised TSD range [-1, 1] (``tsd_to_uint8`` stores them;
    ``aligned_tsd`` is None under ``baseline``) and the final ``latents`` of each stage.
    """

    frames: torch.Tensor
    timings: dict[str, float]
    settings: dict[str, Any]
    aligned_tsd: torch.Tensor | None = None
    coarse_tsd: torch.Tensor | None = None
    latents: dict[str, torch.Tensor] = field(default_factory=dict)

    def frames_uint8(self) -> torch.Tensor:
        """Frames as (B, H, W, 3) uint8 on the CPU, ready for PNG/video encoders."""
        return (self.frames.clamp(0, 1) * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _mark_graph_step() -> None:
    """Tell CUDA-graph trees a new denoising step begins (after :meth:`ConsistentAvatarPipeline.compile`).

    With ``mode="reduce-overhead"`` the networks replay CUDA graphs whose outputs live in a shared
    memory pool; marking each step lets the ControlNet's residuals feed the UNet of the same step
    while the previous step's buffers are reused. A no-op cost when nothing is compiled.
    """
    torch.compiler.cudagraph_mark_step_begin()


class _TSDMEpsilon:
    """Stage 2 as a :class:`~.models.denoiser.Denoiser`: tokens and coarse latent computed once."""

    def __init__(self, model: TSDM) -> None:
        self.model = model

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        # ε in float32: the scheduler's update then runs in full precision whatever the model dtype.
        _mark_graph_step()
        return self.model(sample, timestep, cond["tokens"], cond["coarse_latent"]).float()


class _FCSDEpsilon:
    """Stage 3 as a Denoiser: f_d and z_c computed once per call."""

    def __init__(self, model: FCSD) -> None:
        self.model = model

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        _mark_graph_step()
        return self.model(sample, timestep, cond["tokens"], cond["control"]).float()


# ------------------------------------------------------------------------------------------------
# Input checks (all of them run before any network does)
# ------------------------------------------------------------------------------------------------


def _check_image_input(name: str, x: object, size: int, batch: int | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConsistentAvatarError(
            f"{name} must be a torch.Tensor (B, 3, {size}, {size}), got {type(x).__name__}"
        )
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
        hint = ""
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            hint = " (channels last? use x.permute(0, 3, 1, 2))"
        elif x.ndim == 4 and x.shape[1] == 3:
            hint = f": resize the stage-1 renders to {size}×{size}, the bundle's resolution"
        elif x.ndim == 3:
            hint = " (add the batch dimension with x[None])"
        raise ConsistentAvatarError(
            f"{name} must have shape (B, 3, {size}, {size}), got {tuple(x.shape)}{hint}"
        )
    if x.shape[0] == 0:
        raise ConsistentAvatarError(f"{name} is an empty batch")
    if batch is not None and x.shape[0] != batch:
        raise ConsistentAvatarError(f"{name} has batch size {x.shape[0]}, coarse_rgb has {batch}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ConsistentAvatarError(
            f"{name} must be uint8 (0..255) or floating point in [0, 1], got {x.dtype}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ConsistentAvatarError(f"{name} contains NaN or infinite values")
    lo, hi = torch.aminmax(x)
    if float(lo) < -_RANGE_TOLERANCE or float(hi) > 1.0 + _RANGE_TOLERANCE:
        raise ConsistentAvatarError(
            f"{name} has values in [{float(lo):.3g}, {float(hi):.3g}]; float images must be in [0, 1] "
            "(divide 8-bit values by 255, or pass uint8)"
        )
    return x


def _check_vector_input(name: str, x: object, dim: int, batch: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConsistentAvatarError(f"{name} must be a torch.Tensor ({batch}, {dim}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ConsistentAvatarError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ConsistentAvatarError(f"{name} must have shape (B, {dim}), got {tuple(x.shape)}")
    if x.shape[0] != batch:
        raise ConsistentAvatarError(f"{name} has batch size {x.shape[0]}, coarse_rgb has {batch}")
    if not bool(torch.isfinite(x).all()):
        raise ConsistentAvatarError(f"{name} contains NaN or infinite values")
    return x


def _check_latent_input(name: str, x: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConsistentAvatarError(f"{name} must be a floating-point torch.Tensor {shape}, got {type(x).__name__}"
                                    + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if tuple(x.shape) != shape:
        raise ConsistentAvatarError(
            f"{name} must have shape {shape} (batch, the preset's latent channels and size), got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ConsistentAvatarError(f"{name} contains NaN or infinite values")
    return x


def _to_signed(image: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] → float32 [-1, 1] (the models' image convention)."""
    if image.dtype == torch.uint8:
        return image.float() / 127.5 - 1.0
    return (image.float() * 2.0 - 1.0).clamp_(-1.0, 1.0)


def _generators(
    seed: int | Sequence[int] | None,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    batch: int,
    device: torch.device | str = "cpu",
) -> torch.Generator | list[torch.Generator]:
    """The call's noise generators: the caller's, else ones seeded with ``seed`` on ``device``."""
    if generator is not None:
        if isinstance(generator, torch.Generator):
            return generator
        if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
            if len(generator) != batch:
                raise ConsistentAvatarError(f"{len(generator)} generators given for a batch of {batch}")
            return list(generator)
        raise ConsistentAvatarError("generator must be a torch.Generator or a list of one per frame")
    if seed is None:
        seed = 0
    if isinstance(seed, bool):
        raise ConsistentAvatarError("seed must be an integer or a list of integers, got a bool")
    if isinstance(seed, int):
        return torch.Generator(device).manual_seed(seed)
    if isinstance(seed, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
        if len(seed) != batch:
            raise ConsistentAvatarError(f"{len(seed)} seeds given for a batch of {batch}")
        return [torch.Generator(device).manual_seed(s) for s in seed]
    raise ConsistentAvatarError(f"seed must be an integer or a list of one integer per frame, got {seed!r}")


class _PhaseTimer:
    """Seconds per phase of one call. On a CPU the host clock; on a GPU a pair of CUDA events per
    phase on the pipeline device's stream, read by :meth:`read` only after the call's one final
    synchronisation (reading them earlier would wait for the GPU mid-call). A phase timed twice
    (e.g. a refiner pass) adds up."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.events: list[tuple[str, Any, Any]] = []  # (phase, begin, end): objects with elapsed_time (ms)

    @contextmanager
    def phase(self, key: str) -> Iterator[None]:
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            return
        stream = torch.cuda.current_stream(self.device)  # the pipeline's device, not the current one
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
        self.events.append((key, begin, end))

    def read(self) -> dict[str, float]:
        out = dict(self.seconds)
        for key, begin, end in self.events:
            out[key] = out.get(key, 0.0) + begin.elapsed_time(end) / 1000.0
        return out


def _refiner_seed(
    seed: int | Sequence[int] | None,
    generator: object,
    gens: torch.Generator | list[torch.Generator],
) -> int | list[int]:
    """The refiner's seed(s): per-frame when the frames' noise is per-frame (a list of seeds or of
    generators), so that a refined frame does not depend on the batch it was rendered in."""

    def draw(g: torch.Generator) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device))

    if generator is None and isinstance(seed, int):
        return seed
    if generator is None and seed is not None and not isinstance(seed, int):
        return [int(v) for v in seed]
    return draw(gens) if isinstance(gens, torch.Generator) else [draw(g) for g in gens]


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------


class ConsistentAvatarPipeline:
    """TSDM + FCSD (+ their LCM students) + emotion table + optional refiner, as one renderer.

    Build with :meth:`from_bundle`, or directly from models (``tsdm`` / ``fcsd`` map a variant,
    ``"teacher"`` or ``"lcm"``, to a model; all share one preset). Call it with a batch of frames.
    Models passed in are used as they are (not switched to eval mode or frozen: a trainer may render
    probes with its live models); bundles load theirs in eval mode without gradients.
    """

    def __init__(
        self,
        *,
        preset: ModelPreset,
        tsdm: Mapping[Variant, TSDM],
        fcsd: Mapping[Variant, FCSD],
        emotions: EmotionTable,
        sampling: SamplingDefaults | None = None,
        lcm: Mapping[Stage, LCMDistillConfig] | None = None,
        tsd: TSDConfig | None = None,
        refiner: Refiner | None = None,
        actor: str | None = None,
    ) -> None:
        if not fcsd:
            raise ConsistentAvatarError("the pipeline needs at least one FCSD (stage 3) model")
        for what, models, cls in (("tsdm", tsdm, TSDM), ("fcsd", fcsd, FCSD)):
            for variant, model in models.items():
                if variant not in VARIANTS:
                    raise ConsistentAvatarError(f"{what} variant {variant!r} is not one of {list(VARIANTS)}")
                if not isinstance(model, cls):
                    raise ConsistentAvatarError(
                        f"{what}[{variant!r}] must be a {cls.__name__}, got {type(model).__name__}"
                    )
                if (
                    model.preset.resolution != preset.resolution
                    or model.preset.latent_size != preset.latent_size
                ):
                    raise ConsistentAvatarError(
                        f"{what}[{variant!r}] was built for another preset than {preset.name!r}"
                    )
        if emotions.dim != preset.conditioning.emotion_dim:
            raise ConsistentAvatarError(
                f"emotion embeddings have {emotions.dim} dims, "
                f"the preset takes {preset.conditioning.emotion_dim}"
            )
        if refiner is not None and not isinstance(refiner, Refiner):
            raise ConsistentAvatarError(f"refiner must be a Refiner, got {type(refiner).__name__}")
        self.preset = preset
        self.tsdm: dict[Variant, TSDM] = dict(tsdm)
        self.fcsd: dict[Variant, FCSD] = dict(fcsd)
        self.sampling = sampling or SamplingDefaults()
        self.lcm: dict[Stage, LCMDistillConfig] = {
            s: (lcm or {}).get(s) or LCMDistillConfig() for s in STAGES
        }
        self.tsd = tsd or TSDConfig()
        self.refiner = refiner
        self.actor = actor
        first = next(iter(self.fcsd.values()))
        param = next(first.unet.parameters())
        self._device, self._dtype = param.device, param.dtype
        self.emotions = emotions.to(device=self._device, dtype=self._dtype)
        self._schedulers: dict[tuple[str, str, int], SchedulerMixin] = {}

    # ---- construction and placement ---------------------------------------------------------

    @classmethod
    def from_bundle(
        cls,
        bundle: ActorBundle | str | os.PathLike[str],
        *,
        refiner: Refiner | str | os.PathLike[str] | bool | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        variants: Sequence[Variant] | None = None,
    ) -> ConsistentAvatarPipeline:
        """A pipeline over a loaded :class:`ActorBundle` (or a bundle path/URI, loaded on ``device``).

        ``refiner``: None loads the refiner the bundle references, if any; True does too but
        requires one; False renders without; a path or a :class:`Refiner` overrides the reference.
        """
        if not isinstance(bundle, ActorBundle):
            bundle = load_bundle(bundle, device, dtype, variants=variants)
        ref: Refiner | None = None
        if isinstance(refiner, Refiner):
            ref = refiner
        elif isinstance(refiner, (str, os.PathLike)) or (
            (refiner is None or refiner is True) and bundle.refiner is not None
        ):
            settings = bundle.refiner
            if isinstance(refiner, (str, os.PathLike)):
                path = Path(refiner)
            else:
                assert settings is not None
                path = Path(settings.path)
            try:
                ref = Refiner.from_pretrained(
                    path,
                    strength=settings.strength if settings else 0.2,
                    num_steps=settings.num_steps if settings else 20,
                    device=bundle.device,
                    dtype=bundle.dtype,
                )
            except ConsistentAvatarError as exc:
                raise ConsistentAvatarError(
                    f"{exc} — the bundle of {bundle.actor!r} references this refiner; "
                    "pass refiner=PATH to use "
                    "another copy, or refiner=False to render without it"
                ) from exc
        elif not (refiner is None or isinstance(refiner, bool)):
            raise ConsistentAvatarError(
                f"refiner must be a Refiner, a path, True/None or False, got {refiner!r}"
            )
        if refiner is True and ref is None:
            raise ConsistentAvatarError(
                f"the bundle of {bundle.actor!r} references no refiner: pass refiner=PATH"
            )
        return cls(
            preset=bundle.preset,
            tsdm=bundle.tsdm,
            fcsd=bundle.fcsd,
            emotions=bundle.emotions,
            sampling=bundle.sampling,
            lcm={s: bundle.lcm_config(s) for s in STAGES},
            tsd=bundle.manifest.tsd,
            refiner=ref,
            actor=bundle.actor,
        )

    def _models(self) -> Iterator[TSDM | FCSD]:
        yield from self.tsdm.values()
        yield from self.fcsd.values()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        memory_format: torch.memory_format | None = None,
    ) -> ConsistentAvatarPipeline:
        """Move every network (and the emotion table) to ``device`` and/or cast to ``dtype`` (e.g.
        ``torch.bfloat16`` on GPU). The refiner stays where it was loaded (:meth:`from_bundle` loads it on
        the bundle's device); ``refine`` moves frames to it and back.

        ``memory_format=torch.channels_last`` stores every conv weight NHWC: cuDNN's bf16/fp16
        convolutions run NHWC natively, and a conv with an NHWC weight makes its output NHWC, so the
        whole network (VAE included) then runs without layout transposes. Values are unchanged."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ConsistentAvatarError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if memory_format not in (None, torch.channels_last, torch.contiguous_format):
            raise ConsistentAvatarError(
                f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format!r}"
            )
        device = torch.device(device) if device is not None else self._device
        dtype = dtype or self._dtype
        for m in self._models():
            m.to(device=device, dtype=dtype)
            if memory_format is not None:
                m.to(memory_format=memory_format)
        self.emotions = self.emotions.to(device=device, dtype=dtype)
        self._device, self._dtype = device, dtype
        return self

    def compile(
        self,
        mode: str | None = "auto",
        *,
        backend: str = "inductor",
        fullgraph: bool = False,
        dynamic: bool = False,
        vae: bool = True,
        channels_last: bool | None = None,
    ) -> ConsistentAvatarPipeline:
        """Wrap every UNet, ControlNet and VAE forward with ``torch.compile`` (in place; first calls compile).

        ``mode="auto"``: ``"reduce-overhead"`` (inductor + CUDA graphs) on a GPU, inductor's default
        mode elsewhere. Shapes are static per batch size and step count and each per-step call is a
        pure function of tensors, so CUDA graphs apply; every new batch size compiles and captures
        again (minutes at sd15 shapes), so keep the batch size fixed (``cavatar render --compile`` pads
        the last batch). ``mode`` is only passed to the inductor backend. ``vae``: also compile the VAE
        encoder and decoder — at 512² its three passes are half of an eager call at batch 16.
        ``channels_last`` (default: on a GPU): NHWC conv weights (:meth:`to`); with inductor it made
        the sd15 pipeline faster on an H200, while eager it made it slower (benchmarks/README.md).
        """
        on_gpu = self._device.type == "cuda"
        if mode == "auto":
            mode = "reduce-overhead" if on_gpu else None
        if channels_last is None:
            channels_last = on_gpu and backend == "inductor"
        if channels_last:
            self.to(memory_format=torch.channels_last)
        opts: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
        if backend == "inductor" and mode is not None:
            opts["mode"] = mode
        seen: set[int] = set()
        for model in self._models():
            if id(model) in seen:  # a variant may share its model with another
                continue
            seen.add(id(model))
            if isinstance(model, FCSD):
                model.controlnet.compile(**opts)
            model.unet.compile(**opts)
            if vae and id(model.vae) not in seen:
                seen.add(id(model.vae))
                model.vae.encoder.compile(**opts)
                model.vae.decoder.compile(**opts)
        return self

    def adopt(self, other: ConsistentAvatarPipeline) -> ConsistentAvatarPipeline:
        """Become ``other``'s renderer without rebuilding this one: copy its network weights into this
        pipeline's networks *in place* and take its emotion table, sampling defaults, LCM and TSD
        settings, refiner and actor name. Returns self; ``other`` can then be dropped.

        Why: a compiled pipeline (:meth:`compile`) costs minutes of compilation and CUDA-graph
        capture, and both depend only on shapes and on where the weights live — CUDA graphs replay
        against the parameters' memory, which an in-place copy keeps. A bulk render of many actors
        of one preset therefore compiles once per renderer instead of once per actor
        (``cavatar render --compile``). Refused, naming the difference, unless both pipelines hold
        the same preset and the same variants with the same state-dict keys and shapes.
        """
        if not isinstance(other, ConsistentAvatarPipeline):
            raise ConsistentAvatarError(f"adopt takes a ConsistentAvatarPipeline, got {type(other).__name__}")
        if other.preset.model_dump() != self.preset.model_dump():
            raise ConsistentAvatarError(
                f"cannot adopt actor {other.actor!r}: its preset {other.preset.name!r} differs from this "
                f"pipeline's {self.preset.name!r} (build a new pipeline for it)"
            )
        if set(other.tsdm) != set(self.tsdm) or set(other.fcsd) != set(self.fcsd):
            raise ConsistentAvatarError(
                f"cannot adopt actor {other.actor!r}: it holds variants tsdm={sorted(other.tsdm)}, "
                f"fcsd={sorted(other.fcsd)}; this pipeline tsdm={sorted(self.tsdm)}, fcsd={sorted(self.fcsd)}"
            )
        pairs = [(self.tsdm[v], other.tsdm[v]) for v in self.tsdm] + [(self.fcsd[v], other.fcsd[v]) for v in self.fcsd]
        plans = []
        for mine, theirs in pairs:  # check everything before changing anything
            dst, src = mine.state_dict(), theirs.state_dict()
            if dst.keys() != src.keys() or any(dst[k].shape != src[k].shape for k in dst):
                raise ConsistentAvatarError(
                    f"cannot adopt actor {other.actor!r}: its {type(theirs).__name__} networks differ in "
                    "layout from this pipeline's (another model version?): build a new pipeline for it"
                )
            plans.append((dst, src))
        with torch.no_grad():
            for dst, src in plans:
                for key, tensor in dst.items():  # state_dict tensors share the parameters' memory
                    tensor.copy_(src[key])
        self.emotions = other.emotions.to(device=self._device, dtype=self._dtype)
        self.sampling = other.sampling
        self.lcm = dict(other.lcm)
        self.tsd = other.tsd
        self.refiner = other.refiner
        self.actor = other.actor
        self._schedulers.clear()  # built from the LCM settings just taken
        return self

    # ---- sampling settings ------------------------------------------------------------------

    def _scheduler(self, stage: Stage, kind: SchedulerKind, steps: int) -> SchedulerMixin:
        key = (stage, kind, steps)
        if key not in self._schedulers:
            if kind == "lcm":
                cfg = self.lcm[stage]
                sched = inference_scheduler(
                    "lcm", steps, original_steps=cfg.num_ddim_timesteps, timestep_scaling=cfg.timestep_scaling
                )
            else:
                sched = inference_scheduler(kind, steps, spacing=self.sampling.spacing)
            self._schedulers[key] = sched
        sched = self._schedulers[key]
        set_steps(sched, steps)  # fresh state (multistep solvers keep history)
        return sched

    def _resolve_sampling(
        self, sampler: SchedulerKind | None, num_steps: int | None, without_lcm: bool, baseline: bool
    ) -> tuple[SchedulerKind, Variant, int]:
        if sampler is not None and sampler not in get_args(SchedulerKind):
            raise ConsistentAvatarError(f"sampler must be one of {get_args(SchedulerKind)}, got {sampler!r}")
        has_lcm = "lcm" in self.fcsd and (baseline or "lcm" in self.tsdm)
        kind: SchedulerKind
        if without_lcm:
            if sampler == "lcm":
                raise ConsistentAvatarError(
                    "without_lcm samples the teacher ε-models: choose sampler='ddim' or 'dpm' "
                    "(or drop without_lcm)"
                )
            kind = sampler or self.sampling.teacher_sampler
        elif sampler is not None:
            kind = sampler
        elif self.sampling.sampler == "lcm" and not has_lcm:
            kind = self.sampling.teacher_sampler  # a bundle without students: its teachers
        else:
            kind = self.sampling.sampler
        variant: Variant = "lcm" if kind == "lcm" else "teacher"
        needed = [("fcsd", self.fcsd)] + ([] if baseline else [("tsdm", self.tsdm)])
        for stage, models in needed:
            if variant not in models:
                held = sorted(models)
                fix = (
                    "use sampler='ddim' / without_lcm=True"
                    if variant == "lcm"
                    else "use sampler='lcm' (or load the bundle's teacher weights)"
                )
                raise ConsistentAvatarError(
                    f"sampler {kind!r} needs the {variant} weights of {stage}, "
                    f"but this pipeline holds {held}: {fix}"
                )
        if num_steps is None:
            num_steps = self.sampling.num_steps if variant == "lcm" else self.sampling.teacher_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ConsistentAvatarError(f"num_steps must be a positive integer, got {num_steps!r}")
        return kind, variant, num_steps

    # ---- rendering --------------------------------------------------------------------------

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _noise(self, batch: int, gens: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """N(0, I) latents drawn on the generators' device, then moved to the pipeline's."""
        p = self.preset
        shape = (batch, p.latent_channels, p.latent_size, p.latent_size)
        return randn_tensor(shape, generator=gens, device=self._device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(
        self,
        coarse_rgb: torch.Tensor,
        coarse_normal: torch.Tensor | None,
        pose: torch.Tensor,
        expression: torch.Tensor,
        emotion: object = None,
        *,
        num_steps: int | None = None,
        sampler: SchedulerKind | None = None,
        seed: int | Sequence[int] | None = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        baseline: bool = False,
        without_normal: bool = False,
        without_emotion: bool = False,
        without_lcm: bool = False,
        refine: bool | None = None,
        return_intermediates: bool = False,
        coarse_latent: torch.Tensor | None = None,
    ) -> PipelineOutput:
        """Render B frames.

        ``coarse_rgb``, ``coarse_normal``: stage-1 renders (B, 3, H, W), uint8 or float in [0, 1]
        (normal maps in the layout's (n + 1) / 2 encoding). ``pose`` (B, 6), ``expression`` (B, 100):
        FLAME parameters. ``emotion``: label(s), id(s) (B,) or CLIP text embeddings (B, 768).
        ``sampler`` / ``num_steps``: default to the bundle's sampling defaults (LCM, 4 steps; the
        teachers with DDIM, 25 steps, under ``without_lcm``). ``seed``: one integer for the batch or
        one per frame; ``generator`` (one, or one per frame) overrides it. ``refine``: run the refiner
        (default: if one is loaded). The ablation switches are described in the module docstring.
        ``coarse_latent``: the coarse TSD's VAE latent (B, C, h, w), as ``vae_encode(tsdm.vae, coarse
        TSD)`` gives it — what ``cavatar prepare`` stores as ``latent_tsd_coarse`` when the shards were
        prepared with this bundle's VAE; stage 2 then skips its VAE encode. The caller vouches that it
        comes from the same VAE (unused under ``baseline``, which has no stage 2).
        Every input is checked before any network runs.
        """
        for name, flag in (
            ("baseline", baseline),
            ("without_normal", without_normal),
            ("without_emotion", without_emotion),
            ("without_lcm", without_lcm),
            ("return_intermediates", return_intermediates),
        ):
            if not isinstance(flag, bool):
                raise ConsistentAvatarError(f"{name} must be True or False, got {flag!r}")
        if refine and self.refiner is None:
            raise ConsistentAvatarError(
                "refine=True but no refiner is loaded (from_bundle(..., refiner=PATH))"
            )
        use_refiner = self.refiner is not None and refine is not False
        kind, variant, steps = self._resolve_sampling(sampler, num_steps, without_lcm, baseline)

        size = self.preset.resolution
        rgb = _check_image_input("coarse_rgb", coarse_rgb, size, None)
        b = rgb.shape[0]
        if coarse_normal is None:
            if not without_normal:
                raise ConsistentAvatarError(
                    "coarse_normal is required (it may be None only with without_normal=True)"
                )
        else:
            coarse_normal = _check_image_input("coarse_normal", coarse_normal, size, b)
        pose = _check_vector_input("pose", pose, POSE_DIM, b)
        expression = _check_vector_input("expression", expression, EXPRESSION_DIM, b)
        if emotion is None:
            if not without_emotion:
                raise ConsistentAvatarError(
                    f"emotion is required: a label of {list(self.emotions.labels)}, ids (B,) or embeddings "
                    f"(B, {self.emotions.dim}) (it may be None only with without_emotion=True)"
                )
            emotion_embedding = torch.zeros(b, self.emotions.dim, device=self._device, dtype=self._dtype)
        else:
            emotion_embedding = self.emotions.lookup(emotion, b)
        if coarse_latent is not None:
            p = self.preset
            coarse_latent = _check_latent_input(
                "coarse_latent", coarse_latent, (b, p.latent_channels, p.latent_size, p.latent_size)
            )
        gens = _generators(seed, generator, b, self._device)
        stage3_scheduler = self._scheduler("fcsd", kind, steps)
        stage2_scheduler = None if baseline else self._scheduler("tsdm", kind, steps)

        # ---- everything is valid: run the networks ------------------------------------------
        dev, dt = self._device, self._dtype
        timer = _PhaseTimer(dev)
        self._sync()  # the wall clock starts with the GPU idle: `total` is this call's alone
        start = time.perf_counter()
        pose = pose.to(device=dev, dtype=dt)
        expression = expression.to(device=dev, dtype=dt)
        emotion_embedding = emotion_embedding.to(device=dev, dtype=dt)
        with timer.phase("tsd"):
            coarse_tsd = temporally_sensitive_detail(rgb.to(dev), self.tsd).to(dt)
            if without_normal:
                normal = torch.zeros_like(coarse_tsd)
            else:
                assert coarse_normal is not None
                normal = _to_signed(coarse_normal.to(dev)).to(dt)

        latents: dict[str, torch.Tensor] = {}
        aligned_tsd: torch.Tensor | None = None
        nonfinite: dict[str, torch.Tensor] = {}  # stage → device flag: NaN/inf in its sampled latents
        if not baseline:
            assert stage2_scheduler is not None
            tsdm = self.tsdm[variant]
            with timer.phase("stage2"):
                if coarse_latent is None:
                    coarse_latent = vae_encode(tsdm.vae, coarse_tsd)  # VAE encode #1
                else:  # precomputed by the caller (the shards' latent_tsd_coarse): no encode
                    coarse_latent = coarse_latent.to(device=dev, dtype=dt)
                tokens = tsdm.conditioning(coarse_tsd, pose, expression, validate=False)
                x0 = sample(
                    _TSDMEpsilon(tsdm),
                    self._noise(b, gens),
                    {"tokens": tokens, "coarse_latent": coarse_latent},
                    stage2_scheduler,
                    steps,
                    generator=gens,  # type: ignore[arg-type]  # diffusers takes one or a list
                )
                nonfinite["stage 2 (TSDM)"] = ~torch.isfinite(x0).all()  # read after the final sync
                aligned_tsd = vae_decode(tsdm.vae, x0).to(dt)  # VAE decode #1
            latents["tsd"] = x0
        detail = coarse_tsd if aligned_tsd is None else aligned_tsd

        fcsd = self.fcsd[variant]
        with timer.phase("stage3"):
            tokens = fcsd.conditioning(detail, pose, expression, emotion_embedding, validate=False)
            if without_emotion:
                tokens = tokens.clone()
                tokens[:, EMOTION_TOKEN] = 0.0
            control = torch.cat([normal, detail], dim=1)
            x0 = sample(
                _FCSDEpsilon(fcsd),
                self._noise(b, gens),
                {"tokens": tokens, "control": control},
                stage3_scheduler,
                steps,
                generator=gens,  # type: ignore[arg-type]
            )
            nonfinite["stage 3 (FCSD)"] = ~torch.isfinite(x0).all()
            frames = vae_decode(fcsd.vae, x0)  # VAE decode #2
        latents["frame"] = x0

        if use_refiner:
            assert self.refiner is not None
            with timer.phase("refiner"):
                frames = self.refiner.refine(frames, seed=_refiner_seed(seed, generator, gens), value_range="signed")
        out_frames = (frames.float() + 1.0) * 0.5
        self._sync()
        timings = {**timer.read(), "total": time.perf_counter() - start}
        failed = [stage for stage, flag in nonfinite.items() if bool(flag)]
        if failed:
            name = str(dt).removeprefix("torch.")
            hint = "" if dt == torch.float32 else f", or {name} overflowed (try float32)"
            raise ConsistentAvatarError(
                f"{' and '.join(failed)} sampled NaN or infinite latents ({variant} weights, {kind}, {steps} "
                f"steps, {name}): check the bundle's weights and the inputs{hint}"
            )
        settings = {
            "actor": self.actor,
            "sampler": kind,
            "num_steps": steps,
            "variant": variant,
            "baseline": baseline,
            "without_normal": without_normal,
            "without_emotion": without_emotion,
            "without_lcm": without_lcm,
            "refiner": use_refiner,
            "batch": b,
            "device": str(dev),
            "dtype": str(dt).removeprefix("torch."),
        }
        if not return_intermediates:
            return PipelineOutput(frames=out_frames, timings=timings, settings=settings)
        return PipelineOutput(
            frames=out_frames,
            timings=timings,
            settings=settings,
            aligned_tsd=None if aligned_tsd is None else aligned_tsd.float(),
            coarse_tsd=coarse_tsd.float(),
            latents=latents,
        )
