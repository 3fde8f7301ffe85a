"""The DeepSpeed configuration of a stage and the ZeRO fast paths (``zero_fast.lean_zero_step`` and
``zero_fast.lean_zero_backward``).

One process, world size 1, gloo on CPU, the ``tiny`` preset's stage 2 (TSDM) on random inputs: the
fused gradient norm and overflow test give DeepSpeed's own answers, a non-finite gradient still skips
the step, gradients copied in one go after the backward give DeepSpeed's own weights, the stage trains
(its loss falls) and resumes from a checkpoint exactly as without them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from conftest import end_process_group

from consistent_avatar.models import load_preset
from consistent_avatar.training import TrainConfig
from consistent_avatar.training.data import StageCollate
from consistent_avatar.training.loop import build_engine, deepspeed_config, setup_backend
from consistent_avatar.training.zero_fast import _tiling_buffer
from consistent_avatar.training.stages import StageSpec


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    store = tmp_path_factory.mktemp("pg") / "store"
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    setup_backend(torch.device("cpu"), {})
    try:
        yield
    finally:
        end_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spec(
    tmp_path: Path, precision: str, lean: bool, lr: float = 1e-3, lean_backward: bool | None = None, **update: Any
) -> StageSpec:
    cfg = TrainConfig().stage("tsdm").model_copy(
        update={"batch_size": 2, "micro_batch_size": 2, "precision": precision, "lr": lr, **update}
    ).model_dump(mode="json")
    return StageSpec(
        actor="t", stage="tsdm", preset=load_preset("tiny").model_dump(mode="json"), config=cfg,  # type: ignore[arg-type]
        performance={"lean_zero_step": lean, "lean_zero_backward": lean if lean_backward is None else lean_backward}, seed=0, num_workers=1, probe_files=[], columns=[],
        collate=StageCollate("t", "tsdm"), stage_dir=str(tmp_path / f"tsdm-{precision}-{lean}"),
    )


def _batch() -> dict[str, torch.Tensor]:
    p = load_preset("tiny")
    g = torch.Generator().manual_seed(0)
    r, c, s = p.resolution, p.latent_channels, p.latent_size
    return {
        "coarse_tsd": torch.rand(2, 3, r, r, generator=g) * 2 - 1,
        "pose": torch.randn(2, 6, generator=g),
        "expression": torch.randn(2, 100, generator=g),
        "target_latent": torch.randn(2, c, s, s, generator=g),
        "coarse_latent": torch.randn(2, c, s, s, generator=g),
    }


def _engine(
    tmp_path: Path, precision: str, lean: bool, lr: float = 1e-3, lean_backward: bool | None = None, **update: Any
) -> tuple[Any, Any]:
    torch.manual_seed(0)
    spec = _spec(tmp_path, precision, lean, lr, lean_backward, **update)
    runner, engine, _ = build_engine(spec, torch.device("cpu"), 1)
    return runner, engine


def _weights(runner: Any) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in runner.trainable_parameters()]


def test_deepspeed_config_states_the_zero_and_bf16_options() -> None:
    cfg = TrainConfig().stage("fcsd").model_dump(mode="json")
    ds = deepspeed_config(cfg, 1, bf16=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["contiguous_gradients"] and not zero["overlap_comm"]
    assert not zero["round_robin_gradients"] and zero["reduce_bucket_size"] >= 4e8
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["gradient_clipping"] == cfg["grad_clip"] > 0  # clipping (hence the norm) stays on
    assert deepspeed_config({**cfg, "zero_stage": 1}, 1, bf16=False)["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fused_norm_and_overflow_match_deepspeed(process_group: None, tmp_path: Path, precision: str) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    runner, engine = _engine(tmp_path, precision, lean=True)
    opt = engine.optimizer
    assert opt.get_grad_norm_direct.__name__ == "grad_norm"  # installed on the instance
    engine.backward(runner.loss(engine, _batch(), torch.Generator().manual_seed(1)))
    grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
    assert _tiling_buffer([g for g in grads if not getattr(g, "_zero_padding", False)][: len(params)]) is not None
    fused = opt.get_grad_norm_direct(grads, params)
    reference = DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params)
    assert fused.dtype == reference.dtype and float(fused) > 0
    assert math.isclose(float(fused), float(reference), rel_tol=1e-6)
    assert not bool(opt.has_overflow_partitioned_grads_serial())
    grads[len(grads) // 2].view(-1)[0] = float("nan")
    assert bool(opt.has_overflow_partitioned_grads_serial())
    assert bool(DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt))
    assert float(opt.get_grad_norm_direct(grads, params)) == -1.0  # DeepSpeed's invalid-norm sentinel
    before = _weights(runner)
    engine.step()  # the non-finite gradient skips the step, as DeepSpeed's own check does
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(runner)))


def test_fused_step_trains_like_deepspeeds_and_resumes(process_group: None, tmp_path: Path) -> None:
    batch = _batch()
    runs: dict[bool, tuple[list[float], list[float], list[torch.Tensor]]] = {}
    for lean in (False, True):
        runner, engine = _engine(tmp_path, "bf16", lean)
        gen = torch.Generator().manual_seed(3)
        losses, norms = [], []
        for _ in range(8):
            loss = runner.loss(engine, batch, gen)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            norms.append(float(engine.get_global_grad_norm()))
        runs[lean] = (losses, norms, _weights(runner))
        if lean:
            engine.save_checkpoint(str(tmp_path / "ckpt"), tag="s8")
            probe = runner.probe(batch, 9)
    (l0, n0, w0), (l1, n1, w1) = runs[False], runs[True]
    assert l1 == pytest.approx(l0, rel=1e-5) and n1 == pytest.approx(n0, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))  # same clipping factor: same bf16 weights
    assert sum(l1[-3:]) < sum(l1[:3])  # the stage learns on its batch
    runner, engine = _engine(tmp_path, "bf16", lean=True)
    engine.load_checkpoint(str(tmp_path / "ckpt"), tag="s8")
    assert int(engine.global_steps) == 8
    assert all(torch.equal(a, b) for a, b in zip(w1, _weights(runner)))
    assert runner.probe(batch, 9) == probe
    engine.backward(runner.loss(engine, batch, torch.Generator().manual_seed(4)))
    engine.step()  # the resumed engine steps with the fused paths too
    assert engine.optimizer.get_grad_norm_direct.__name__ == "grad_norm" and int(engine.global_steps) == 9


@pytest.mark.parametrize("zero_stage, accumulation", [(1, 1), (2, 2)])
def test_fused_step_equals_deepspeeds_under_zero1_and_gradient_accumulation(
    process_group: None, tmp_path: Path, zero_stage: int, accumulation: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The equivalence does not rest on ZeRO-2 with one micro-batch per step: under ZeRO-1, and ZeRO-2
    accumulating two micro-batches per optimiser step, the fused paths run (no fallback) and give
    DeepSpeed's own weights and norms."""
    import consistent_avatar.training.zero_fast as loop

    batch = _batch()
    runs = {}
    tiled: list[bool] = []
    real_tiling = loop._tiling_buffer
    monkeypatch.setattr(loop, "_tiling_buffer", lambda g: tiled.append((b := real_tiling(g)) is not None) or b)
    for lean in (False, True):
        runner, engine = _engine(tmp_path, "bf16", lean, zero_stage=zero_stage, batch_size=2 * accumulation)
        gen = torch.Generator().manual_seed(5)
        norms = []
        for micro in range(1, 3 * accumulation + 1):
            engine.backward(runner.loss(engine, batch, gen))
            engine.step()  # DeepSpeed steps the optimiser once every `accumulation` micro-batches
            if micro % accumulation == 0:
                norms.append(float(engine.get_global_grad_norm()))
        assert int(engine.global_steps) == 3
        runs[lean] = (norms, _weights(runner))
    assert tiled and all(tiled)  # every fused norm / overflow call found one flat buffer
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


def _flat_grads(engine: Any) -> torch.Tensor:
    grads = engine.optimizer.averaged_gradients[0]
    return torch.cat([g.reshape(-1) for g in grads if not getattr(g, "_zero_padding", False)])


def test_lean_backward_gives_deepspeeds_gradients_and_weights(process_group: None, tmp_path: Path) -> None:
    """Without DeepSpeed's per-parameter hooks, the gradients that reach its partition after one backward
    are bitwise DeepSpeed's own, and eight bf16 steps end on the same weights (the fused norm off, so that
    only the backward differs)."""
    batch = _batch()
    runs = {}
    for lean_backward in (False, True):
        runner, engine = _engine(tmp_path, "bf16", lean=False, lean_backward=lean_backward)
        opt = engine.optimizer
        assert (len(opt._grad_acc_hooks) == 0) == lean_backward  # the hooks are gone, not merely idle
        gen = torch.Generator().manual_seed(6)
        engine.backward(runner.loss(engine, batch, gen))
        first = _flat_grads(engine).clone()
        if lean_backward:
            flat = opt.averaged_gradients[0].flat_partition
            assert flat.numel() == opt.partition_size[0] and torch.equal(flat[: first.numel()], first)
            assert not flat[first.numel() :].any()  # DeepSpeed's alignment padding, if any, stays zero
            assert all(p.grad is None for p in opt.params_in_partition[0])  # gradients live in the buffer only
        engine.step()
        for _ in range(7):
            engine.backward(runner.loss(engine, batch, gen))
            engine.step()
        runs[lean_backward] = (first, float(engine.get_global_grad_norm()), _weights(runner))
    (g0, n0, w0), (g1, n1, w1) = runs[False], runs[True]
    assert torch.equal(g0, g1) and n0 == n1
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def test_lean_backward_zero_fills_a_parameter_without_gradient(process_group: None, tmp_path: Path) -> None:
    """A trainable parameter the step did not reach has zeros in the flat partition (as in DeepSpeed's),
    also when it had a gradient in the persistent buffer from the step before, and the gradients of the
    others are untouched."""
    batch = _batch()
    reference_runner, reference = _engine(tmp_path, "bf16", lean=True)
    reference.backward(reference_runner.loss(reference, batch, torch.Generator().manual_seed(2)))
    runner, engine = _engine(tmp_path, "bf16", lean=True)
    params = engine.optimizer.params_in_partition[0]
    skipped = len(params) // 3
    offset = sum(p.numel() for p in params[:skipped])
    n = params[skipped].numel()
    # a first step in which every parameter has a gradient: the persistent flat buffer then holds a
    # non-zero gradient where the skipped parameter's goes, which the next backward must clear
    engine.backward(runner.loss(engine, batch, torch.Generator().manual_seed(2)))
    flat = engine.optimizer.averaged_gradients[0].flat_partition
    assert flat[offset : offset + n].abs().sum() > 0
    engine.step()
    # the reference stepped once too, so that both compute the second backward from the same weights
    reference.step()
    reference.backward(reference_runner.loss(reference, batch, torch.Generator().manual_seed(2)))
    expected = _flat_grads(reference)
    # drop this parameter's gradient as soon as it is accumulated: the epilogue then sees none
    params[skipped].register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    engine.backward(runner.loss(engine, batch, torch.Generator().manual_seed(2)))
    got = _flat_grads(engine)
    assert engine.optimizer.averaged_gradients[0].flat_partition.data_ptr() == flat.data_ptr()  # the same buffer
    assert expected[offset : offset + n].abs().sum() > 0 and not got[offset : offset + n].any()
    assert torch.equal(got[:offset], expected[:offset]) and torch.equal(got[offset + n :], expected[offset + n :])
    engine.step()
    assert int(engine.global_steps) == 2


@pytest.mark.parametrize("update", [{"zero_stage": 1}, {"batch_size": 4}])
def test_lean_backward_leaves_other_setups_to_deepspeed(process_group: None, tmp_path: Path, update: dict[str, Any]) -> None:
    """ZeRO-1 and gradient accumulation (two micro-batches of 2 per step) keep DeepSpeed's hooks."""
    from consistent_avatar.training.zero_fast import lean_zero_backward

    runner, engine = _engine(tmp_path, "bf16", lean=True, **update)
    assert len(engine.optimizer._grad_acc_hooks) > 0
    assert not lean_zero_backward(engine)


def test_compile_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """performance.compile_mode is the inductor mode the trainer compiles its UNets/ControlNets with;
    unset, stage 3 compiles with CUDA graphs (reduce-overhead: its step is host-bound without them) and
    the stages not yet measured so on a GPU with inductor's default; an unknown mode is a config error."""
    import types

    from diffusers import UNet2DConditionModel

    from consistent_avatar.errors import ConsistentAvatarError
    from consistent_avatar.training.loop import _prepare_modules

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=4,
        attention_head_dim=2, sample_size=8,
    )
    seen: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: seen.append((type(self).__name__, k)))
    runner = types.SimpleNamespace(speed_roots=lambda: [unet])

    def modes(stage: str, **performance: Any) -> list[tuple[str, dict[str, Any]]]:
        seen.clear()
        perf = TrainConfig.parse({"performance": {"compile": True, "channels_last": False, **performance}})
        spec = types.SimpleNamespace(stage=stage, performance=perf.performance.model_dump(mode="json"))
        _prepare_modules(runner, spec, cuda=False)  # type: ignore[arg-type]
        return list(seen)

    assert modes("lcm_fcsd", compile_mode="reduce-overhead") == [("UNet2DConditionModel", {"mode": "reduce-overhead"})]
    assert modes("fcsd", compile_mode="default") == [("UNet2DConditionModel", {"mode": "default"})]
    assert modes("fcsd") == [("UNet2DConditionModel", {"mode": "reduce-overhead"})]
    assert modes("tsdm") == modes("lcm_fcsd") == modes("lcm_tsdm") == [("UNet2DConditionModel", {"mode": "default"})]
    with pytest.raises(ConsistentAvatarError, match="compile_mode"):
        TrainConfig.parse({"performance": {"compile_mode": "fastest"}})


def test_a_generator_state_of_another_kind_reseeds_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The trainer draws its noise on the training device; a checkpoint whose RNG state is another
    generator's (a CPU generator's, saved by an older version on a GPU) resumes with a fresh, seeded
    stream and says so, instead of failing."""
    from consistent_avatar.training.loop import restore_generator

    saved = torch.Generator().manual_seed(5)
    torch.randn(3, generator=saved)
    gen = torch.Generator().manual_seed(11)
    restore_generator(gen, saved.get_state(), step=40)  # same kind: the exact stream continues
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=saved))
    gen = torch.Generator().manual_seed(11)
    with caplog.at_level("WARNING"):
        restore_generator(gen, torch.zeros(16, dtype=torch.uint8), step=40)  # a CUDA generator's state size
    assert "another kind of generator" in caplog.text
    assert gen.initial_seed() == 11 + 7919 * 40
    again = torch.Generator().manual_seed(11 + 7919 * 40)
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=again))
