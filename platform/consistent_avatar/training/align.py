"""The stage-3 training inputs: aligned TSD for every training frame, from the trained stage 2.

The paper trains stage 3 "based on the outputs of the first two stages": the ControlNet condition
z_c = concat(coarse normal, TSD) and the TSD code in f_d come from stage 2's *aligned* TSD, not from
the real frame's TSD, which does not exist at render time. So after stage 2 (and its LCM
distillation) a Ray Data job streams the actor's training rows through the trained TSDM —
``map_batches`` with a pool of stateful model replicas, sampling with the same sampler and step
count the renderer uses (LCM, 4 steps, by default) — and writes the rows stage 3 needs plus a
``tsd_aligned`` PNG column as parquet into the actor's run folder (staged, then renamed into place).
Stage 3 then reads those files instead of the shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ActorDataError
from ..io import encode_png, publish_dir, staging_dir
from .data import ALIGNED_TSD_COLUMN, StageCollate, to_device


class AlignedTSDWriter:
    """Ray Data UDF: a TSDM replica that adds ``tsd_aligned`` to each batch of rows."""

    def __init__(
        self,
        actor: str,
        preset: dict[str, Any],
        weights: str,
        sampler: str,
        steps: int,
        seed: int,
        distill: dict[str, Any],
        latent_shape: tuple[int, ...] | None,
        use_gpu: bool,
    ) -> None:
        from ..models.lcm import LCMDistillConfig
        from ..models.presets import parse_preset
        from ..models.sampling import inference_scheduler
        from ..models.tsdm import build_tsdm
        from .denoisers import TSDMDenoiser
        from .weights import load_weights

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = build_tsdm(parse_preset(preset))
        load_weights(model, weights)
        self.model = model.to(self.device, self.dtype).eval()
        self.denoiser = TSDMDenoiser(self.model)
        if sampler == "lcm":
            d = LCMDistillConfig.parse(distill)
            self.scheduler = inference_scheduler(
                "lcm", steps, original_steps=d.num_ddim_timesteps, timestep_scaling=d.timestep_scaling
            )
        else:
            self.scheduler = inference_scheduler("ddim", steps)
        self.steps = steps
        self.seed = seed
        self.collate = StageCollate(actor, "tsdm", latent_shape=latent_shape)
        self.actor = actor

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..models.components import vae_encode
        from ..models.sampling import sample
        from ..tsd import tsd_to_uint8

        b = self.collate(batch)
        first_frame = int(b["frame"][0])
        b = to_device(b, self.device)  # images: uint8 → [-1, 1] floats
        coarse = b["coarse_tsd"].to(self.dtype)
        if "coarse_latent" in b:
            z = b["coarse_latent"].to(self.dtype)
        else:
            z = vae_encode(self.model.vae, coarse)
        cond = {
            "coarse_tsd": coarse,
            "pose": b["pose"].to(self.dtype),
            "expression": b["expression"].to(self.dtype),
            "coarse_latent": z,
        }
        # One generator per batch, seeded by its first frame: reruns give the same maps.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + first_frame)
        noise = torch.randn(z.shape, generator=gen).to(self.device, self.dtype)
        latents = sample(self.denoiser, noise, cond, self.scheduler, self.steps, gen)
        tsd = self.model.decode(latents).float()
        if not torch.isfinite(tsd).all():
            raise ActorDataError(self.actor, "the trained TSDM produced non-finite TSD maps: stage 2 diverged")
        u8 = tsd_to_uint8(tsd).permute(0, 2, 3, 1).cpu().numpy()
        out = dict(batch)
        out[ALIGNED_TSD_COLUMN] = np.array([encode_png(x) for x in u8], dtype=object)
        return out


def write_aligned_tsd(
    *,
    actor: str,
    files: list[str] | tuple[str, ...],
    columns: list[str],
    out_dir: Path,
    preset: dict[str, Any],
    weights: str,
    sampler: str,
    steps: int,
    seed: int,
    distill: dict[str, Any],
    latent_shape: tuple[int, ...] | None,
    batch_size: int,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    read_cpus: float,
) -> list[str]:
    """Run the aligned-TSD pass over the actor's training rows; returns the published parquet files."""
    import ray.data

    from .data import train_dataset

    needed = list(dict.fromkeys([*columns, "tsd_coarse", "pose", "expression", "frame"]))
    if latent_shape is not None:
        needed.append("latent_tsd_coarse")
    ds = train_dataset(files, needed, num_cpus=read_cpus).map_batches(
        AlignedTSDWriter,
        fn_constructor_kwargs={
            "actor": actor,
            "preset": preset,
            "weights": weights,
            "sampler": sampler,
            "steps": steps,
            "seed": seed,
            "distill": distill,
            "latent_shape": latent_shape,
            "use_gpu": use_gpu,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=1 if use_gpu else None,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(out_dir)
    try:
        ds.write_parquet(str(staged))
        publish_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return sorted(str(p) for p in out_dir.glob("*.parquet"))
