"""What each training stage optimises, as seen by the generic worker loop (:mod:`.loop`).

Five stages, all trained by the same DeepSpeed loop; a :class:`StageRunner` supplies the module the
engine wraps (only its trainable parameters reach the optimiser), the loss of one batch, what to do
after an optimiser step, a deterministic probe loss and a sample grid for TensorBoard:

=========  ==============================================================  ======================
stage      module handed to DeepSpeed                                        loss
=========  ==============================================================  ======================
vae        stage 0 (optional): the AutoencoderKL                             reconstruction + KL
tsdm       stage 2: ``TrainingObjective(TSDM)``                              ε-MSE, eq. 6
lcm_tsdm   the LCM student of the trained TSDM (teacher + EMA target kept)  consistency, Sec. 4.3
fcsd       stage 3: ``TrainingObjective(FCSD)``                              ε-MSE, eq. 9
lcm_fcsd   the LCM student of the trained FCSD                               consistency
=========  ==============================================================  ======================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConsistentAvatarError
from ..models.components import load_shared_components, load_vae, vae_decode, vae_encode
from ..models.fcsd import build_fcsd
from ..models.objective import TrainingObjective
from ..models.presets import ModelPreset, parse_preset
from ..models.tsdm import build_tsdm
from .config import StageName
from .data import Kind, StageCollate
from .denoisers import FCSDDenoiser, TSDMDenoiser
from .weights import load_weights

EMA_FILE = "ema_target.safetensors"

STAGE_KIND: dict[str, Kind] = {"vae": "vae", "tsdm": "tsdm", "lcm_tsdm": "tsdm", "fcsd": "fcsd", "lcm_fcsd": "fcsd"}
STAGE_TITLE = {
    "vae": "stage 0 (VAE fit)",
    "tsdm": "stage 2 (TSDM)",
    "lcm_tsdm": "LCM distillation of stage 2",
    "fcsd": "stage 3 (FCSD)",
    "lcm_fcsd": "LCM distillation of stage 3",
}


@dataclass
class StageSpec:
    """Everything a worker needs to run one stage of one actor (picklable, sent as the loop config)."""

    actor: str
    stage: StageName
    preset: dict[str, Any]
    config: dict[str, Any]
    performance: dict[str, Any]
    seed: int
    num_workers: int
    probe_files: list[str]
    columns: list[str]
    collate: StageCollate
    stage_dir: str
    inputs: dict[str, str] = field(default_factory=dict)
    shuffle_buffer: int = 64
    prefetch_batches: int = 2
    progress: Any = None  # a ProgressBoard actor handle, or None

    @property
    def model_preset(self) -> ModelPreset:
        return parse_preset(self.preset)


class VAEObjective(nn.Module):
    """Stage 0: reconstruct frames and TSD maps through the VAE (MSE + ``kl_weight`` · KL)."""

    def __init__(self, vae: nn.Module, kl_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        x = batch["images"]
        if not x.is_floating_point():  # the collate's uint8: to_device makes the [-1, 1] floats
            raise ConsistentAvatarError(
                f"VAE stage images must be floats in [-1, 1], got {x.dtype}: pass the batch through training.data.to_device"
            )
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        rec = self.vae.decode(posterior.sample(generator)).sample
        return F.mse_loss(rec.float(), x.float()) + self.kl_weight * posterior.kl().float().mean()


def _grid(columns: list[torch.Tensor]) -> torch.Tensor:
    """(3, rows·H, cols·W) image in [0, 1] from per-column batches in [-1, 1]."""
    rows = torch.cat([c.detach().float().cpu().clamp(-1, 1) for c in columns], dim=3)  # B,3,H,W·cols
    return (torch.cat(list(rows), dim=1) + 1.0) / 2.0


class StageRunner:
    """Base: the stage's module, loss, probe and samples. Subclasses build the model."""

    module: nn.Module

    def __init__(self, spec: StageSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.preset = spec.model_preset
        self.noise_scheduler = self.preset.noise_schedule.make_ddpm()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def attach(self, engine: Any) -> None:
        """Called once the engine has placed (and cast) the module."""
        self.engine = engine

    def speed_roots(self) -> list[nn.Module]:
        """Every network a step runs (for channels-last / compile)."""
        return [self.module]

    def loss(self, forward: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return forward(batch, generator)  # type: ignore[no-any-return]

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def probe(self, batch: dict[str, torch.Tensor], seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        return float(self.loss(self.module, batch, gen))

    def samples(self, batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor | None:
        return None

    def save_extra(self, folder: Path) -> None:
        pass

    def load_extra(self, folder: Path) -> None:
        pass

    def shared(self) -> Any:
        return load_shared_components(self.preset, seed=self.spec.seed)


class VAERunner(StageRunner):
    def __init__(self, spec: StageSpec, device: torch.device) -> None:
        super().__init__(spec, device)
        vae, _ = load_vae(self.preset, seed=spec.seed)
        vae.requires_grad_(True).train()
        self.module = VAEObjective(vae, float(spec.config.get("kl_weight", 1e-6)))

    @torch.no_grad()
    def samples(self, batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        vae = self.module.vae  # type: ignore[union-attr]
        x = batch["images"]
        rec = vae_decode(vae, vae_encode(vae, x))
        return _grid([x, rec])


def _sample_latents(denoiser: nn.Module, cond: dict[str, torch.Tensor], like: torch.Tensor, scheduler: Any, steps: int, seed: int) -> torch.Tensor:
    from ..models.sampling import sample

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(like.shape, generator=gen).to(like.device, like.dtype)
    return sample(denoiser, noise, cond, scheduler, steps, gen)


class DiffusionRunner(StageRunner):
    """A diffusion stage trained with ε-MSE, or (``distill=True``) its LCM distillation from the
    weights in ``inputs['teacher']``: the student trains, the teacher and EMA target stay frozen."""

    build: Any = None  # build_tsdm / build_fcsd
    denoiser_cls: Any = None  # TSDMDenoiser / FCSDDenoiser

    def __init__(self, spec: StageSpec, device: torch.device, distill: bool = False) -> None:
        super().__init__(spec, device)
        self.model = type(self).build(self.preset, self.shared(), seed=spec.seed)
        self.distiller = None
        if distill:
            from ..models.lcm import ConsistencyDistiller, LCMDistillConfig

            load_weights(self.model, spec.inputs["teacher"])
            self.distiller = ConsistencyDistiller(
                type(self).denoiser_cls(self.model),
                LCMDistillConfig.parse(spec.config["distill"]),
                noise_scheduler=self.noise_scheduler,
            )
            self.module = self.distiller.student
        else:
            # values are checked on the CPU by StageCollate (training.data): no per-step GPU read-back
            self.module = TrainingObjective(self.model, self.noise_scheduler, check_values=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.distiller is not None:
            return self.distiller.trainable_parameters()
        return self.model.trainable_parameters()  # type: ignore[no-any-return]

    def attach(self, engine: Any) -> None:
        super().attach(engine)
        if self.distiller is not None:
            dtype = next(self.module.parameters()).dtype
            self.distiller.teacher.to(self.device, dtype)
            self.distiller.target.to(self.device)  # fp32: a bf16 EMA would lose μ-sized updates

    def speed_roots(self) -> list[nn.Module]:
        if self.distiller is None:
            return [self.module]
        return [self.module, self.distiller.teacher, self.distiller.target]

    def trained(self) -> Any:
        """The stage model being trained (inside the DeepSpeed-managed module)."""
        return self.module.model  # type: ignore[union-attr]

    def x0_and_cond(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def grid_columns(self, batch: dict[str, torch.Tensor], x0: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def loss(self, forward: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        if self.distiller is None:
            return forward(batch, generator)  # type: ignore[no-any-return]
        x0, cond = self.x0_and_cond(batch)
        return self.distiller.loss(x0, cond, generator, student=forward)

    def after_step(self) -> None:
        if self.distiller is not None:
            self.distiller.update_target()

    @torch.no_grad()
    def probe(self, batch: dict[str, torch.Tensor], seed: int) -> float:
        """Stages 2/3: the ε-loss under fixed noise and timesteps. LCM: how far the student's one-step
        consistency output f_θ(x_t, t) is from the frozen teacher's ODE solution from the same x_t (what
        distillation is for). The consistency loss itself is no progress measure: it starts near zero,
        student and EMA target being copies of the teacher, and the moving target keeps it from a trend."""
        if self.distiller is None:
            return super().probe(batch, seed)
        from ..models.lcm import consistency_function

        if getattr(self, "_ode", None) is None:
            self._ode = self._teacher_solution(batch, seed)
        x_t, t, cond, solution = self._ode
        scaling = self.distiller.config.timestep_scaling
        f = consistency_function(self.module, x_t, t, cond, self.distiller.noise_scheduler, scaling)
        return float(F.mse_loss(f.float(), solution))

    def _teacher_solution(self, batch: dict[str, torch.Tensor], seed: int) -> tuple[Any, ...]:
        """Fixed (x_t, t) on the distillation grid and the teacher's DDIM solution of the ODE to t = 0."""
        from ..models.lcm import ddim_step
        from ..models.sampling import denoise

        d = self.distiller
        assert d is not None
        x0, cond = self.x0_and_cond(batch)
        gen = torch.Generator().manual_seed(seed)
        t = d.timesteps[torch.randint(0, len(d.timesteps), (x0.shape[0],), generator=gen)].to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
        x_t = d.noise_scheduler.add_noise(x0, noise, t)
        x, now = x_t.clone(), t.clone()
        while bool((now > 0).any()):
            eps = denoise(d.teacher, x, now, cond)
            prev = (now - d.skip).clamp(min=0)
            x = torch.where((now > 0).view(-1, 1, 1, 1), ddim_step(x, eps, now, prev, d.noise_scheduler), x)
            now = prev
        return x_t, t, cond, x.float()

    @torch.no_grad()
    def samples(self, batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        from ..models.sampling import inference_scheduler

        x0, cond = self.x0_and_cond(batch)
        if self.distiller is not None:
            steps = int(self.spec.config.get("inference_steps", 4))
            scheduler = self.distiller.inference_scheduler(steps)
            denoiser: nn.Module = self.module
        else:
            steps = int(self.spec.config.get("sample_steps", 8))
            scheduler = inference_scheduler("ddim", steps)
            denoiser = type(self).denoiser_cls(self.trained())
        latents = _sample_latents(denoiser, cond, x0, scheduler, steps, seed)
        out = self.trained().decode(latents.to(next(self.trained().vae.parameters()).dtype))
        return _grid(self.grid_columns(batch, x0, out))

    def save_extra(self, folder: Path) -> None:
        if self.distiller is not None:
            _save_ema(self.distiller, folder)

    def load_extra(self, folder: Path) -> None:
        if self.distiller is not None:
            _load_ema(self.distiller, folder)


class TSDMRunner(DiffusionRunner):
    build = staticmethod(build_tsdm)
    denoiser_cls = TSDMDenoiser

    def x0_and_cond(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        vae = self.trained().vae
        with torch.no_grad():
            x0 = batch["target_latent"] if "target_latent" in batch else vae_encode(vae, batch["target_tsd"]).float()
            coarse = batch["coarse_latent"] if "coarse_latent" in batch else vae_encode(vae, batch["coarse_tsd"]).float()
        cond = {"coarse_tsd": batch["coarse_tsd"], "pose": batch["pose"], "expression": batch["expression"], "coarse_latent": coarse}
        return x0, cond

    def grid_columns(self, batch: dict[str, torch.Tensor], x0: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
        target = batch["target_tsd"] if "target_tsd" in batch else self.trained().decode(x0)
        return [batch["coarse_tsd"], out, target]


class FCSDRunner(DiffusionRunner):
    build = staticmethod(build_fcsd)
    denoiser_cls = FCSDDenoiser

    def x0_and_cond(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        vae = self.trained().vae
        with torch.no_grad():
            x0 = batch["image_latent"] if "image_latent" in batch else vae_encode(vae, batch["image"]).float()
        return x0, {k: batch[k] for k in ("tsd", "normal", "pose", "expression", "emotion")}

    def grid_columns(self, batch: dict[str, torch.Tensor], x0: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
        target = batch["image"] if "image" in batch else self.trained().decode(x0)
        return [batch["normal"], batch["tsd"], out, target]


def _ema_pairs(distiller: Any) -> list[tuple[str, torch.Tensor]]:
    student = dict(distiller.student.named_parameters())
    return [(n, p) for n, p in distiller.target.named_parameters() if student[n].requires_grad]


def _save_ema(distiller: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({n: p.detach().float().cpu().contiguous() for n, p in _ema_pairs(distiller)}, str(folder / EMA_FILE))


def _load_ema(distiller: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / EMA_FILE
    if not path.is_file():
        raise ConsistentAvatarError(f"LCM checkpoint {folder} lacks {EMA_FILE}: it was not written by this trainer")
    saved = load_file(str(path))
    with torch.no_grad():
        for n, p in _ema_pairs(distiller):
            p.copy_(saved[n].to(p.device, p.dtype))


def make_runner(spec: StageSpec, device: torch.device) -> StageRunner:
    if spec.stage == "vae":
        return VAERunner(spec, device)
    if spec.stage in ("tsdm", "lcm_tsdm"):
        return TSDMRunner(spec, device, distill=spec.stage == "lcm_tsdm")
    if spec.stage in ("fcsd", "lcm_fcsd"):
        return FCSDRunner(spec, device, distill=spec.stage == "lcm_fcsd")
    raise ConsistentAvatarError(f"unknown training stage {spec.stage!r}")
