"""Settings of one `cavatar render` run, and the ablation rows it can render.

A *row* is a named set of the pipeline's ablation switches (the rows of the paper's Tables 1 and 2),
rendered from the same bundles; see :mod:`consistent_avatar.pipeline` for what each switch removes.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConsistentAvatarError

# The pipeline's SchedulerKind, spelled out: importing it pulls in torch and diffusers, which the
# driver-side checks and the video tasks do not need (the tests assert both lists agree).
SchedulerKind = Literal["lcm", "ddim", "dpm"]

Row = Literal["full", "baseline", "without_normal", "without_emotion", "without_lcm"]
Split = Literal["test", "train", "all"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

#: row name → the keyword switches of ``ConsistentAvatarPipeline.__call__`` it sets
ROWS: dict[str, dict[str, bool]] = {
    "full": {},
    "baseline": {"baseline": True},
    "without_normal": {"without_normal": True},
    "without_emotion": {"without_emotion": True},
    "without_lcm": {"without_lcm": True},
}
SWITCHES = ("baseline", "without_normal", "without_emotion", "without_lcm")
assert set(ROWS) == set(get_args(Row))


def row_switches(row: str) -> dict[str, bool]:
    """All four switches of ``row`` (False where the row does not set one)."""
    return {s: ROWS[row].get(s, False) for s in SWITCHES}


class RenderConfig(BaseModel):
    """What to render and how. Every field that changes the pixels is recorded with the outputs, so
    a re-run with different settings is refused instead of silently mixing frames (``force``)."""

    model_config = ConfigDict(extra="forbid")

    split: Split = Field("test", description="frames to render: the test split (paper), train, or all")
    actors: list[str] | None = Field(None, description="actor names; None = every prepared actor")
    rows: list[Row] = Field(default_factory=lambda: ["full"], min_length=1, description="ablation rows")
    sampler: SchedulerKind | None = Field(
        None, description="sampler of every row but without_lcm (default: the bundle's, LCM)"
    )
    steps: int | None = Field(None, ge=1, le=1000, description="steps of every row but without_lcm")
    teacher_sampler: Literal["ddim", "dpm"] | None = Field(
        None, description="sampler of the without_lcm row (default: the bundle's teacher sampler)"
    )
    teacher_steps: int | None = Field(
        None, ge=1, le=1000,
        description="steps when the teachers sample: the without_lcm row, and any row under a ddim/dpm "
        "sampler without `steps` (default: the bundle's, 25)",
    )
    seed: int = Field(0, ge=0, description="frame i is sampled with seed + i, whatever the batching")
    batch_size: int = Field(8, ge=1, le=4096, description="frames per network call (one actor each)")
    concurrency: int | tuple[int, int] | None = Field(
        None, description="pool actors: N, or (min, max) to autoscale; default: what the cluster fits"
    )
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per pool actor (0: CPU)")
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs per pool actor (torch threads on CPU)")
    io_cpus: float = Field(
        0.1, gt=0.0, le=64.0,
        description="CPUs each load task (shard read, PNG decode) and write task (PNG encode, parquet) asks "
        "Ray for; the pool leaves at least two such tasks' worth of the cluster's CPUs free",
    )
    dtype: DType = Field("auto", description="network dtype; auto = bfloat16 on GPU, float32 on CPU")
    compile: bool = Field(False, description="torch.compile the UNets, ControlNets and VAE in each pool actor")
    compile_cache: str | None = Field(
        None,
        description="folder (ideally on a volume every node mounts) for torch.compile's cache, shared by the pool "
        "actors of this and later jobs; None: torch's default, per node (see consistent_avatar.compile_cache)",
    )
    shard_latents: bool = Field(
        True,
        description="stage 2 takes the coarse TSD's VAE latent from the shards (latent_tsd_coarse) instead "
        "of encoding it, for actors whose shards were prepared with their bundle's VAE (identity by content, "
        "same TSD settings and latent shape); frames differ by the latents' fp16 rounding and record it",
    )
    refine: bool | None = Field(
        None, description="SDXL refiner pass: None = if the bundle references one, False = off, True = required"
    )
    refiner: str | None = Field(None, description="local refiner directory overriding the bundles' reference")
    cache_size: int = Field(2, ge=1, le=64, description="loaded actor pipelines kept per pool actor (LRU)")
    fps: float = Field(25.0, gt=0.0, le=240.0, description="frame rate of the side-by-side mp4")
    video: bool = Field(True, description="write OUT/<row>/<actor>/<actor>.mp4")
    verify_bundles: bool = Field(True, description="check every bundle file's sha256 when it loads")
    force: bool = Field(False, description="re-render frames that exist, also under other settings")
    progress: bool = Field(True, description="tqdm bar of rendered frames")

    @field_validator("rows")
    @classmethod
    def _unique_rows(cls, rows: list[str]) -> list[str]:
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows are listed twice: {rows}")
        return rows

    @field_validator("actors")
    @classmethod
    def _actor_names(cls, actors: list[str] | None) -> list[str] | None:
        if actors is None:
            return None
        if not actors:
            raise ValueError("actors is an empty list: leave it out to render every prepared actor")
        bad = [a for a in actors if not a or "/" in a or a.startswith(".")]
        if bad:
            raise ValueError(f"invalid actor names {bad}")
        if len(set(actors)) != len(actors):
            raise ValueError(f"actors are listed twice: {actors}")
        return actors

    @model_validator(mode="after")
    def _consistent(self) -> RenderConfig:
        if isinstance(self.concurrency, int) and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if isinstance(self.concurrency, tuple):
            lo, hi = self.concurrency
            if lo < 1 or hi < lo:
                raise ValueError(f"concurrency (min, max) must have 1 <= min <= max, got {self.concurrency}")
        if self.refine is False and self.refiner is not None:
            raise ValueError("refiner is set but refine is False")
        if self.compile_cache is not None and not self.compile:
            raise ValueError("compile_cache is set but compile is off: nothing would use it (add compile)")
        return self

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus_per_actor > 0

    @property
    def torch_dtype_name(self) -> str:
        """The dtype the networks run in (``auto`` resolved against the device)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.use_gpu else "float32"

    @classmethod
    def build(cls, **fields: object) -> RenderConfig:
        """Validate ``fields``; a bad value is a :class:`ConsistentAvatarError` naming the field."""
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise ConsistentAvatarError(f"invalid render settings: {problems}") from None
