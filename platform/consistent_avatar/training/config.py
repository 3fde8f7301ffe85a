"""`cavatar train` settings: one validated pydantic model, printed back into every actor's summary.

Defaults are the paper's (Sec. 5.1): stage 2 (TSDM) Adam lr 1e-5, 3000 iterations, batch 4; stage 3
(FCSD) Adam lr 1e-4, 15000 iterations, batch 4. ``batch_size`` is the *effective* (global) batch:
``workers × micro_batch_size × gradient accumulation``; by default each worker takes an equal
share in one micro-batch (no accumulation), which is the fastest way to the same batch.

Model sizes never live here: they come from the model preset (:mod:`..models.presets`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConsistentAvatarError
from ..models.lcm import LCMDistillConfig

Precision = Literal["auto", "bf16", "fp32"]
StageName = Literal["vae", "tsdm", "lcm_tsdm", "fcsd", "lcm_fcsd"]
STAGE_ORDER: tuple[StageName, ...] = ("vae", "tsdm", "lcm_tsdm", "fcsd", "lcm_fcsd")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class StageConfig(_Strict):
    """Optimisation of one stage (one Ray Train run)."""

    lr: float = Field(gt=0, description="Adam learning rate")
    iterations: int = Field(ge=1, description="optimiser steps")
    batch_size: int = Field(4, ge=1, description="effective batch (all workers, all accumulation steps)")
    micro_batch_size: int | None = Field(
        None, ge=1, description="samples per worker per forward; default batch_size // workers"
    )
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="global gradient-norm clip (None: off)")
    checkpoint_every: int = Field(500, ge=1, description="optimiser steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="checkpoints kept in storage")
    log_every: int = Field(10, ge=1, description="steps between loss points (TensorBoard, progress)")
    sample_every: int = Field(1000, ge=1, description="steps between sample image grids in TensorBoard")
    sample_steps: int = Field(8, ge=1, description="sampler steps for those grids")
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Precision = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")

    def split(self, workers: int) -> tuple[int, int]:
        """(micro batch per worker, gradient accumulation steps) that make ``batch_size``."""
        micro = self.micro_batch_size or max(1, self.batch_size // workers)
        if self.batch_size % (micro * workers):
            raise ConsistentAvatarError(
                f"batch_size {self.batch_size} is not a multiple of workers × micro_batch_size "
                f"({workers} × {micro}): choose sizes with batch_size = workers × micro × accumulation"
            )
        return micro, self.batch_size // (micro * workers)


class VAEStageConfig(StageConfig):
    """Stage 0 (not in the paper): fit the frozen VAE on the actor's frames and TSD maps.

    ``auto`` runs it only when the preset names no pretrained VAE: a randomly initialised
    autoencoder is not an inverse of itself, so its latents would be noise to decode.
    """

    enabled: Literal["auto", "always", "never"] = "auto"
    kl_weight: float = Field(1e-6, ge=0, description="KL term of the VAE objective (SD's VAE: ~1e-6)")


class LCMStageConfig(StageConfig):
    """Latent consistency distillation of one trained stage (paper Sec. 4.3)."""

    distill: LCMDistillConfig = Field(default_factory=LCMDistillConfig)
    inference_steps: int = Field(4, ge=1, description="LCM steps used for sample grids and the aligned-TSD pass")


class AlignConfig(_Strict):
    """What stage 3 is conditioned on during training.

    ``aligned`` (the paper: stage 3 trains "based on the outputs of the first two stages"): the trained
    TSDM turns every training frame's coarse TSD into an aligned TSD, in one Ray Data pass, and stage 3
    trains on those. ``ground_truth``: the real frame's TSD (an upper bound, for ablation).
    ``coarse``: the stage-1 TSD directly (the paper's baseline, "Stage 1 + Stage 3").
    """

    source: Literal["aligned", "ground_truth", "coarse"] = "aligned"
    sampler: Literal["lcm", "ddim"] = Field(
        "lcm", description="lcm: the distilled TSDM, as at render time; ddim: the undistilled TSDM"
    )
    steps: int = Field(4, ge=1, description="sampler steps")
    batch_size: int = Field(16, ge=1, description="frames per inference call")
    seed: int = 0


class ScalingSection(_Strict):
    """Per-actor trainer resources (one ``ScalingConfig`` per actor)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has any")
    resources_per_worker: dict[str, float] | None = Field(
        None, description='e.g. {"CPU": 4, "GPU": 1}; default 1 CPU (+1 GPU with use_gpu)'
    )
    driver_resources: dict[str, float] = Field(
        default_factory=dict,
        description="resources of each actor's driver task (e.g. a custom 'head' resource to keep it on a safe node)",
    )

    @model_validator(mode="after")
    def _asks_for_something(self) -> ScalingSection:
        """Ray refuses a worker bundle of zeros only when the trainer starts; say it here, with the fix."""
        res = self.resources_per_worker
        if res is not None and (any(v < 0 for v in res.values()) or not any(v > 0 for v in res.values())):
            raise ValueError(
                f"resources_per_worker {res} must ask for a positive amount of something (and nothing negative), "
                'e.g. {"CPU": 1} or {"CPU": 4, "GPU": 1}'
            )
        return self


class DataSection(_Strict):
    use_latents: bool = Field(True, description="train on the shards' VAE latents when they match the model's VAE")
    shuffle_buffer: int = Field(64, ge=0, description="local shuffle buffer (rows) per worker; 0: off")
    prefetch_batches: int = Field(2, ge=0)
    read_cpus: float = Field(0.25, gt=0, description="CPUs per Ray Data read task")


class PerformanceSection(_Strict):
    channels_last: bool | None = Field(None, description="None: on GPU only")
    compile: bool | None = Field(None, description="torch.compile UNet/ControlNet; None: on GPU only")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] | None = Field(
        None,
        description="inductor mode of that compile; None: reduce-overhead (CUDA graphs: the step is host-bound "
        "without them) for the stage measured under CUDA graphs on a GPU (fcsd), default for the others",
    )
    compile_cache: str | None = Field(
        None,
        description="folder for torch.compile's cache shared by every trainer (a volume every node mounts): each "
        "actor and stage after the first of its shapes reuses the compiled kernels; None: torch's default, per node",
    )
    fused_adam: bool | None = Field(None, description="None: on GPU only")
    lean_zero_step: bool = Field(
        True, description="one fused gradient-norm and overflow check per ZeRO step instead of one per parameter"
    )
    lean_zero_backward: bool = Field(
        True,
        description="one worker under ZeRO-2: gradients reach the optimiser's flat buffer in one multi-tensor copy "
        "after the backward instead of a Python hook per parameter during it",
    )
    tf32: bool = True
    train_poll_s: float | None = Field(
        None, gt=0, description="Ray Train controller poll interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); None: Ray's 2 s"
    )


class TrainConfig(_Strict):
    """Everything `cavatar train` needs besides the shards, the actors and the output folder."""

    preset: str = Field("tiny", description="model preset name or JSON path")
    pretrained: dict[str, str] = Field(
        default_factory=dict, description="override the preset's pretrained paths (root, unet, vae, ...)"
    )
    seed: int = 0
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    actor_scaling: dict[str, ScalingSection] = Field(
        default_factory=dict, description="per-actor scaling overrides (actor name → scaling section)"
    )
    data: DataSection = Field(default_factory=DataSection)
    performance: PerformanceSection = Field(default_factory=PerformanceSection)
    vae: VAEStageConfig = Field(
        default_factory=lambda: VAEStageConfig(lr=1e-4, iterations=2000, batch_size=8, checkpoint_every=1000)
    )
    tsdm: StageConfig = Field(default_factory=lambda: StageConfig(lr=1e-5, iterations=3000, batch_size=4))
    lcm_tsdm: LCMStageConfig = Field(
        default_factory=lambda: LCMStageConfig(lr=1e-5, iterations=1000, batch_size=4)
    )
    align: AlignConfig = Field(default_factory=AlignConfig)
    fcsd: StageConfig = Field(
        default_factory=lambda: StageConfig(lr=1e-4, iterations=15000, batch_size=4, checkpoint_every=1000)
    )
    lcm_fcsd: LCMStageConfig = Field(
        default_factory=lambda: LCMStageConfig(lr=1e-5, iterations=1000, batch_size=4)
    )
    until: StageName = Field(
        "lcm_fcsd", description="last stage to train (e.g. tsdm for a stage-2-only run); the bundle needs all"
    )
    max_failures: int = Field(2, ge=-1, description="worker-group restarts per stage (FailureConfig)")
    actor_retries: int = Field(1, ge=0, description="re-runs of an actor's driver task if its node dies")
    max_concurrent_actors: int | None = Field(None, ge=1, description="default: as many as the cluster fits")
    checkpoint_storage: str | None = Field(
        None, description="pyarrow-filesystem URI for checkpoints (s3://, gs://, path); default <out>/<actor>/checkpoints"
    )

    @model_validator(mode="after")
    def _lcm_zero(self) -> TrainConfig:
        for name in ("lcm_tsdm", "lcm_fcsd"):
            if getattr(self, name).zero_stage == 3:
                raise ValueError(
                    f"{name}.zero_stage 3 shards parameters, but the EMA target of consistency distillation "
                    "reads the whole student after every step: use 0, 1 or 2"
                )
        return self

    def stage(self, name: StageName) -> StageConfig:
        return getattr(self, name)  # type: ignore[no-any-return]

    @classmethod
    def parse(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate a mapping; every problem becomes one ConsistentAvatarError naming the fields."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<config>'}: {e['msg']}" for e in exc.errors()
            )
            raise ConsistentAvatarError(f"invalid training config: {problems}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise ConsistentAvatarError(f"training config {p} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConsistentAvatarError(f"training config {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConsistentAvatarError(f"training config {p} must hold a JSON object")
        return cls.parse(data)

    def with_overrides(self, assignments: list[str]) -> TrainConfig:
        """Apply ``key.path=value`` strings (value parsed as JSON, else taken as a string)."""
        data = self.model_dump(mode="json")
        for item in assignments:
            if "=" not in item:
                raise ConsistentAvatarError(f"--set expects key.path=value, got {item!r}")
            key, raw = item.split("=", 1)
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            node = data
            parts = key.strip().split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConsistentAvatarError(f"--set {key}: {part!r} is not a config section")
                node = node[part]
            node[parts[-1]] = value
        return TrainConfig.parse(data)
