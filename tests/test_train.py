"""`cavatar train`: Ray Train + DeepSpeed (gloo, CPU) over real shards from `cavatar synth` + `prepare`.

The two integration tests share one local Ray (2 CPUs, fixture ``ray_local``): workers ask for a
quarter CPU each so that two actors' trainers of two workers fit at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import end_process_group
from actor_factory import synthetic_shards

from consistent_avatar.data.shards import actor_files, decode_images, read_emotion_table
from consistent_avatar.errors import ActorDataError, ConsistentAvatarError
from consistent_avatar.models import load_preset, save_random_components
from consistent_avatar.training import TrainConfig, train
from consistent_avatar.training.actor import ActorOutcome
from consistent_avatar.training.cli import config_from_args, register_cli
from consistent_avatar.training.data import (
    StageCollate,
    inspect_actor,
    read_rows,
    stage_columns,
    to_device,
    train_dataset,
)
from consistent_avatar.training.many import TrainReport, fits, trainer_demand

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic actors (16 frames, 64²: 13 train + 3 test) prepared by the real CLI."""
    return synthetic_shards(tmp_path_factory.mktemp("actors"), tmp_path_factory.mktemp("shards"), 3, 16, 2)


@pytest.fixture(scope="module")
def random_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny VAE: with a pretrained VAE configured, stage 0 is skipped."""
    root = save_random_components(load_preset("tiny"), tmp_path_factory.mktemp("sd") / "tiny", text_encoder=False)
    return root / "vae"


def tiny_config(**sections: Any) -> TrainConfig:
    """Few steps of every stage, 2 workers × ¼ CPU, no checkpoint or grid between start and end."""
    stage = {"iterations": 4, "batch_size": 4, "checkpoint_every": 1000, "log_every": 2, "sample_every": 1000, "sample_steps": 2}
    lcm = {**stage, "lr": 1e-4, "iterations": 10, "inference_steps": 2}
    data: dict[str, Any] = {
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.25}},
        "vae": {**stage, "lr": 1e-3},
        "tsdm": {**stage, "lr": 1e-3},
        "lcm_tsdm": lcm,
        "fcsd": {**stage, "lr": 1e-3},
        "lcm_fcsd": lcm,
        "align": {"steps": 2, "batch_size": 4},
        "data": {"shuffle_buffer": 0},
        "performance": {"train_poll_s": 0.5},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return TrainConfig.parse(data)


# ---------------------------------------------------------------------------------------------
# Config, data, scheduling: no trainers
# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_papers_hyper_parameters() -> None:
    cfg = TrainConfig()
    assert (cfg.tsdm.lr, cfg.tsdm.iterations, cfg.tsdm.batch_size) == (1e-5, 3000, 4)
    assert (cfg.fcsd.lr, cfg.fcsd.iterations, cfg.fcsd.batch_size) == (1e-4, 15000, 4)
    assert cfg.tsdm.zero_stage == cfg.fcsd.zero_stage == 2
    assert cfg.tsdm.precision == "auto" and cfg.align.source == "aligned"
    assert cfg.fcsd.split(1) == (4, 1) and cfg.fcsd.split(2) == (2, 1) and cfg.fcsd.split(4) == (1, 1)
    assert cfg.fcsd.model_copy(update={"micro_batch_size": 1}).split(2) == (1, 2)


def test_bad_config_is_an_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConsistentAvatarError, match=r"tsdm\.lr"):
        TrainConfig.parse({"tsdm": {"lr": -1, "iterations": 3}})
    with pytest.raises(ConsistentAvatarError, match="fcsd.*itertions"):
        TrainConfig.parse({"fcsd": {"lr": 1e-4, "itertions": 3}})
    with pytest.raises(ConsistentAvatarError, match="EMA target"):
        TrainConfig.parse({"lcm_fcsd": {"lr": 1e-5, "iterations": 3, "zero_stage": 3}})
    with pytest.raises(ConsistentAvatarError, match="multiple of workers"):
        TrainConfig().fcsd.split(3)
    cfg = TrainConfig().with_overrides(["fcsd.iterations=20", "align.source=ground_truth", 'pretrained={"root": "/x"}'])
    assert (cfg.fcsd.iterations, cfg.align.source, cfg.pretrained) == (20, "ground_truth", {"root": "/x"})
    with pytest.raises(ConsistentAvatarError, match="not a config section"):
        TrainConfig().with_overrides(["seed.x=1"])
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ConsistentAvatarError, match="not valid JSON"):
        TrainConfig.from_file(bad)


def test_collate_decodes_shard_rows_to_model_batches(shards: Path) -> None:
    files = [str(f) for f in actor_files(shards, "actor_000")]
    labels, table = read_emotion_table(shards)
    rows = read_rows(files, stage_columns("fcsd"), 3)
    collated = StageCollate("actor_000", "fcsd", emotion_table=table)(rows)
    # images leave the collate as uint8 (a quarter of the bytes to copy to a GPU) ...
    assert collated["image"].dtype == torch.uint8
    assert torch.equal(collated["image"], torch.from_numpy(decode_images(rows["real_rgb"])).permute(0, 3, 1, 2))
    # ... and become [-1, 1] floats on the training device, in the requested memory format
    batch = to_device(collated, torch.device("cpu"))
    assert set(batch) == {"frame", "tsd", "normal", "image", "pose", "expression", "emotion"}
    assert batch["image"].shape == (3, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].is_contiguous()
    expected = torch.from_numpy(decode_images(rows["real_rgb"])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(batch["image"], expected)
    last = to_device(collated, torch.device("cpu"), channels_last=True)["image"]
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, expected)
    assert float(batch["tsd"].abs().max()) <= 1.0 and batch["frame"].tolist() == [0, 1, 2]
    assert torch.equal(batch["emotion"], torch.from_numpy(table[np.asarray(rows["emotion_id"], dtype=np.int64)]))
    assert batch["pose"].shape == (3, 6) and batch["expression"].shape == (3, 100)
    tsdm = StageCollate("actor_000", "tsdm")(read_rows(files, stage_columns("tsdm"), 2))
    assert set(tsdm) == {"frame", "coarse_tsd", "target_tsd", "pose", "expression"}
    vae = StageCollate("actor_000", "vae")(read_rows(files, stage_columns("vae"), 2))
    assert vae["images"].shape == (4, 3, 64, 64)  # frames and TSD maps


def test_collate_refuses_non_finite_values_naming_the_frames(shards: Path) -> None:
    """Values are checked where they are read, on the CPU (the training step then checks shapes only)."""
    files = [str(f) for f in actor_files(shards, "actor_000")]
    labels, table = read_emotion_table(shards)
    rows = read_rows(files, stage_columns("fcsd"), 3)
    pose = np.stack([np.asarray(v, dtype=np.float32) for v in rows["pose"]])
    pose[1, 2] = np.nan
    bad = dict(rows, pose=np.array(list(pose), dtype=object))
    with pytest.raises(ActorDataError, match=r"frame 1: column 'pose' holds NaN or infinite values in frames \[1\]"):
        StageCollate("actor_000", "fcsd", emotion_table=table)(bad)
    broken = table.copy()
    broken[0, 0] = np.inf
    with pytest.raises(ActorDataError, match="emotion embedding table holds NaN"):
        StageCollate("actor_000", "fcsd", emotion_table=broken)


def test_an_epoch_of_several_passes_streams_every_train_row_that_many_times(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.data

    files = [str(f) for f in actor_files(shards, "actor_000")]
    train_frames = inspect_actor(shards, "actor_000", 64, 768).train_frames
    # Ray Data's progress bars stay off in every execution a training dataset starts, the read that
    # materialises the passes included, whatever the caller's own DataContext says.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "enable_progress_bars", True)
    bars: list[bool] = []
    materialize = ray.data.Dataset.materialize
    monkeypatch.setattr(ray.data.Dataset, "materialize", lambda ds: bars.append(ds.context.enable_progress_bars) or materialize(ds))
    for passes in (1, 3):
        ds = train_dataset(files, ["frame"], passes=passes)
        frames = [int(r["frame"]) for r in ds.take_all()]
        assert len(frames) == passes * train_frames  # a path listed twice is read once: passes are a union
        assert all(frames.count(f) == passes for f in set(frames))
        assert ds.context.enable_progress_bars is False
    assert bars == [False]  # the 3-pass epoch materialised its read once, without bars


def test_shards_given_as_a_uri_are_inspected_and_read_like_a_path(shards: Path) -> None:
    """A trainer reads shards from any pyarrow filesystem URI (s3://, gs://, file://): the pre-flight
    inspection and the probe-batch read give what the plain path gives (a file:// URI lands on the
    local filesystem, so its files are listed as paths; remote ones are listed as URIs, which Ray Data's
    read_parquet, the trainers' reader, takes as they are). A full tiny run from a file:// URI was
    checked by hand (all stages, bundle exported)."""
    uri = f"file://{shards}"
    by_path = inspect_actor(shards, "actor_000", 64, 768)
    by_uri = inspect_actor(uri, "actor_000", 64, 768)
    assert by_uri.files == by_path.files
    assert (by_uri.train_frames, by_uri.latent_shape, by_uri.emotion_labels) == (
        by_path.train_frames, by_path.latent_shape, by_path.emotion_labels)
    assert np.array_equal(by_uri.emotion_table, by_path.emotion_table)
    cols = stage_columns("tsdm")
    a, b = read_rows(by_path.files, cols, 3), read_rows([f"file://{f}" for f in by_path.files], cols, 3)
    assert all(np.array_equal(x, y) for c in cols for x, y in zip(a[c], b[c], strict=True))
    with pytest.raises(ActorDataError, match=r"actor_000.*nowhere.*cavatar prepare"):
        inspect_actor(f"file://{shards}/nowhere", "actor_000", 64, 768)


def test_corrupt_rows_and_mismatched_shards_are_named(shards: Path) -> None:
    files = [str(f) for f in actor_files(shards, "actor_001")]
    rows = read_rows(files, stage_columns("tsdm"), 2)
    rows["tsd_coarse"] = rows["tsd_coarse"].copy()
    rows["tsd_coarse"][1] = b"not a png"
    with pytest.raises(ActorDataError, match=r"actor 'actor_001', frame 1: corrupt PNG in column 'tsd_coarse'.*prepare --force"):
        StageCollate("actor_001", "tsdm")(rows)
    with pytest.raises(ActorDataError, match=r"64² but the model preset works at 256².*--res 256"):
        inspect_actor(shards, "actor_001", 256, 768)
    with pytest.raises(ActorDataError, match="emotion text embeddings are 768-d"):
        inspect_actor(shards, "actor_001", 64, 512)
    with pytest.raises(ActorDataError, match="not in"):
        inspect_actor(shards, "nobody", 64, 768)
    data = inspect_actor(shards, "actor_001", 64, 768)
    assert data.train_frames == 13 and data.latent_shape is None and len(data.files) == 1


def test_admission_follows_the_scarcest_resource() -> None:
    cluster = {"CPU": 64.0, "GPU": 8.0}
    trainer = {"CPU": 8.0, "GPU": 2.0}
    assert fits({"CPU": 24.0, "GPU": 6.0}, trainer, cluster)
    assert not fits({"CPU": 32.0, "GPU": 8.0}, trainer, cluster)  # GPUs run out before CPUs
    assert not fits({}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 16.0})  # (queued until a GPU node joins)
    assert fits({"CPU": 1.5}, {"CPU": 0.5}, {"CPU": 2.0}) and not fits({"CPU": 1.75}, {"CPU": 0.5}, {"CPU": 2.0})
    # A trainer's demand counts its Ray Data read tasks: two 1-CPU workers cannot share 2 CPUs.
    one_cpu = TrainConfig().with_overrides(['scaling.resources_per_worker={"CPU": 1.0}', "scaling.use_gpu=false"])
    demand = trainer_demand(one_cpu, "a")
    assert demand == {"CPU": 1.0 + one_cpu.data.read_cpus}
    assert not fits(demand, demand, {"CPU": 2.0})
    half = one_cpu.with_overrides(['scaling.resources_per_worker={"CPU": 0.5}'])
    assert fits(trainer_demand(half, "a"), trainer_demand(half, "b"), {"CPU": 2.0})
    report = TrainReport(
        out=Path("/runs"),
        outcomes=[
            ActorOutcome("a", "trained", bundle="/runs/bundles/a", seconds=12),
            ActorOutcome("b", "failed", error="actor 'b': shard file x is unreadable\nmore"),
        ],
        concurrency=2,
    )
    table = report.table()
    assert "FAILED" in table and "unreadable" in table and "more" not in table and "/runs/bundles/a" in table
    assert not report.ok and report.failed == {"b": "actor 'b': shard file x is unreadable\nmore"}


def test_cli_parses_into_the_config(shards: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="cavatar")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "--shards", str(shards), "--actors", "actor_000,actor_001", "--out", str(tmp_path), "--workers", "2",
         "--cpus-per-worker", "0.5", "--set", "fcsd.iterations=7", "--until", "tsdm", "--max-concurrent", "3"]
    )
    cfg = config_from_args(args)
    assert cfg.scaling.num_workers == 2 and cfg.scaling.resources_per_worker == {"CPU": 0.5}
    assert (cfg.fcsd.iterations, cfg.until, cfg.max_concurrent_actors) == (7, "tsdm", 3)
    assert cfg.scaling.use_gpu is None  # GPUs when the cluster has them
    # 0 GPUs per worker: CPU training, also on a GPU cluster, with the default CPU per worker
    for gpus, use_gpu, resources in (("0", False, None), ("0.5", True, {"GPU": 0.5})):
        on = config_from_args(parser.parse_args(["train", "--shards", "S", "--out", "O", "--gpus-per-worker", gpus]))
        assert on.scaling.use_gpu is use_gpu and on.scaling.resources_per_worker == resources
    gpu_config = tmp_path / "gpu.json"  # a config asking for a GPU per worker, overridden on the command line
    gpu_config.write_text(json.dumps({"scaling": {"resources_per_worker": {"GPU": 1}}}))
    off = config_from_args(parser.parse_args(["train", "--shards", "S", "--out", "O", "--config", str(gpu_config),
                                              "--gpus-per-worker", "0"]))
    assert off.scaling.use_gpu is False and off.scaling.resources_per_worker is None
    with pytest.raises(ConsistentAvatarError, match="must ask for a positive amount"):
        config_from_args(parser.parse_args(["train", "--shards", "S", "--out", "O", "--cpus-per-worker", "0"]))
    with pytest.raises(ConsistentAvatarError, match=r"\['nobody'\] are not in"):
        train(shards, ["nobody"], None, tmp_path / "r", cfg)
    with pytest.raises(ConsistentAvatarError, match="unknown model preset"):
        train(shards, ["actor_000"], "huge", tmp_path / "r", cfg)


def test_engine_keeps_frozen_parts_out_of_the_optimiser(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DeepSpeed engine of a stage, in this process (world size 1): Adam holds state for the
    trainable parameters only, and a step leaves the frozen VAE (and an LCM teacher) untouched."""
    from consistent_avatar.training.loop import build_engine, setup_backend
    from consistent_avatar.training.stages import StageSpec
    from consistent_avatar.training.weights import save_weights, without_vae

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        device = torch.device("cpu")
        setup_backend(device, {})
        cfg = tiny_config()
        files = [str(f) for f in actor_files(shards, "actor_000")]
        batch = to_device(StageCollate("actor_000", "tsdm")(read_rows(files, stage_columns("tsdm"), 2)), device)

        def spec(stage: str, inputs: dict[str, str]) -> StageSpec:
            return StageSpec(
                actor="actor_000", stage=stage, preset=load_preset("tiny").model_dump(mode="json"),  # type: ignore[arg-type]
                config={**cfg.stage(stage).model_dump(mode="json"), "batch_size": 2}, performance={}, seed=0,
                num_workers=1, probe_files=files, columns=stage_columns("tsdm"), collate=StageCollate("actor_000", "tsdm"),
                stage_dir=str(tmp_path / stage), inputs=inputs,
            )

        runner, engine, optimizer = build_engine(spec("tsdm", {}), device, 1)
        trainable = sum(p.numel() for p in runner.trainable_parameters())
        total = sum(p.numel() for p in runner.module.parameters())
        vae_before = {k: v.clone() for k, v in runner.module.model.vae.state_dict().items()}
        loss = runner.loss(engine, batch, torch.Generator().manual_seed(0))
        engine.backward(loss)
        engine.step()
        held = sum(s["exp_avg"].numel() for s in optimizer.state.values())
        assert trainable <= held <= trainable + 64 < total
        assert all(torch.equal(v, runner.module.model.vae.state_dict()[k]) for k, v in vae_before.items())
        teacher = save_weights(without_vae({k[6:]: v for k, v in runner.module.state_dict().items()}), tmp_path / "t.safetensors")

        runner, engine, optimizer = build_engine(spec("lcm_tsdm", {"teacher": str(teacher)}), device, 1)
        teacher_before = {k: v.clone() for k, v in runner.distiller.teacher.state_dict().items()}
        target_before = {k: v.clone() for k, v in runner.distiller.target.state_dict().items()}
        loss = runner.loss(engine, batch, torch.Generator().manual_seed(0))
        engine.backward(loss)
        engine.step()
        runner.after_step()
        held = sum(s["exp_avg"].numel() for s in optimizer.state.values())
        assert held <= trainable + 64  # the student only: teacher and EMA target hold no Adam state
        assert all(torch.equal(v, runner.distiller.teacher.state_dict()[k]) for k, v in teacher_before.items())
        moved = [k for k, v in target_before.items() if not torch.equal(v, runner.distiller.target.state_dict()[k])]
        assert moved and not any(k.startswith("model.vae.") for k in moved)  # the EMA follows the student
    finally:
        end_process_group()


# ---------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------


def _scalars(stage_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage_dir / "tensorboard"))
    acc.Reload()
    out = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["_images"] = [float(len(acc.Images(t))) for t in acc.Tags()["images"]]
    return out


@pytest.mark.timeout(1200)  # four stages, a restarted worker group and a second run on 2 loaded cores
def test_actor_trains_every_stage_resumes_after_a_killed_worker_and_exports_a_bundle(
    shards: Path, random_vae: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    iterations = 32  # room between the first committed checkpoint (step 4) and the end for the kill to land
    cfg = tiny_config(pretrained={"vae": str(random_vae)}, tsdm={"iterations": iterations, "checkpoint_every": 4})
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(train(shards, ["actor_000"], "tiny", out, cfg, progress=False)))
    thread.start()
    status = out / "actor_000" / "tsdm" / "status.json"
    # Kill rank 1 once Ray Train has committed a checkpoint (its snapshot in storage lists one).
    snapshot = out / "actor_000" / "checkpoints" / "actor_000-tsdm" / "checkpoint_manager_snapshot.json"
    killed = None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        if status.is_file() and snapshot.is_file():
            try:  # Ray Train rewrites its snapshot in place (truncate, then write): a poll can see it empty
                committed = json.loads(snapshot.read_text()).get("checkpoint_results") or []
            except json.JSONDecodeError:
                committed = []
            s = json.loads(status.read_text())  # written atomically
            if committed:
                assert s["step"] < iterations, "stage 2 finished before a worker could be killed"
                killed = s["worker_pids"][1]
                try:
                    os.kill(killed, signal.SIGKILL)
                except ProcessLookupError:
                    pytest.fail(f"rank 1 (pid {killed}) ended before it could be killed, at step {s['step']}")
        time.sleep(0.05)
    thread.join(timeout=900)
    assert killed is not None and not thread.is_alive()
    report: TrainReport = result[0]
    assert report.ok, report.table()
    outcome = report.outcomes[0]
    assert list(outcome.stages) == ["tsdm", "lcm_tsdm", "fcsd", "lcm_fcsd"]  # stage 0 skipped: VAE given

    tsdm = outcome.stages["tsdm"]
    assert tsdm["steps"] == iterations and tsdm["attempt"] == 2 and 4 <= tsdm["resumed_from"] < iterations
    assert json.loads(status.read_text())["attempt"] == 2
    for name, stage in outcome.stages.items():
        assert stage["steps"] == stage["iterations"], name
        assert stage["probe_loss"] < stage["probe_loss_initial"], (name, stage)
        curves = _scalars(out / "actor_000" / name)
        assert len(curves[f"{name}/loss"]) >= 2 and curves["_images"], name
    kept = json.loads(snapshot.read_text())["checkpoint_results"]
    assert [c["metrics"]["step"] for c in kept] == [iterations - 4, iterations]  # keep_last = 2
    assert all((snapshot.parent / c["checkpoint_dir_name"]).is_dir() for c in kept)

    # stage 3 trained on stage 2's aligned TSD, one row per training frame
    aligned = pq.read_table(sorted((out / "actor_000" / "aligned_tsd").glob("*.parquet")))
    assert sorted(aligned["frame"].to_pylist()) == list(range(13))
    assert decode_images(aligned["tsd_aligned"][:1]).shape == (1, 64, 64, 3)

    summary = json.loads((out / "actor_000" / "summary.json").read_text())
    assert summary["status"] == "trained" and summary["config"]["tsdm"]["iterations"] == iterations
    # the bundle holds what was trained and renders through the pipeline
    from safetensors.torch import load_file

    from consistent_avatar.bundle import load_bundle
    from consistent_avatar.pipeline import ConsistentAvatarPipeline

    bundle = load_bundle(outcome.bundle)
    assert bundle.actor == "actor_000" and bundle.sampling.num_steps == 2
    trained = load_file(outcome.stages["lcm_fcsd"]["weights"])
    loaded = bundle.fcsd["lcm"].state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in trained.items())
    rows = read_rows([str(f) for f in actor_files(shards, "actor_000")], ["coarse_rgb", "coarse_normal", "pose", "expression", "emotion"], 1)
    image = lambda c: torch.from_numpy(decode_images(rows[c])).permute(0, 3, 1, 2)  # noqa: E731
    frame = ConsistentAvatarPipeline.from_bundle(bundle, refiner=False)(
        image("coarse_rgb"), image("coarse_normal"), torch.from_numpy(np.stack(rows["pose"])),
        torch.from_numpy(np.stack(rows["expression"])), [str(rows["emotion"][0])],
    ).frames
    assert frame.shape == (1, 3, 64, 64) and bool(torch.isfinite(frame).all())
    assert json.loads((out / "train_report.json").read_text())["outcomes"][0]["status"] == "trained"

    # A driver killed after the last trainer finished but before it recorded the stage: running the
    # command again skips the finished stages, and the last stage's trainer restores its run from
    # storage and ends at the same step count without training again.
    (out / "actor_000" / "lcm_fcsd" / "result.json").unlink()
    again = train(shards, ["actor_000"], "tiny", out, cfg, progress=False)
    stages = again.outcomes[0].stages
    assert again.ok and again.outcomes[0].bundle == outcome.bundle
    assert [n for n, st in stages.items() if st["skipped"]] == ["tsdm", "lcm_tsdm", "fcsd"]
    assert stages["lcm_fcsd"]["steps"] == 10
    assert json.loads((out / "actor_000" / "lcm_fcsd" / "status.json").read_text())["resumed_from"] == 10


def test_two_actors_train_at_once_and_a_broken_one_fails_alone(shards: Path, tmp_path: Path) -> None:
    broken = actor_files(shards, "actor_002")[0]
    original = broken.read_bytes()
    broken.write_bytes(b"PAR1 this is not parquet")
    try:
        out = tmp_path / "runs"
        cfg = tiny_config(
            until="vae",
            scaling={"num_workers": 1},
            actor_scaling={"actor_000": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}}},
        )
        report = train(shards, ["actor_000", "actor_001", "actor_002"], "tiny", out, cfg, progress=False)
    finally:
        broken.write_bytes(original)
    status = {o.actor: o for o in report.outcomes}
    assert status["actor_000"].status == status["actor_001"].status == "trained", report.table()
    assert status["actor_002"].status == "failed"
    assert f"shard file {broken} is unreadable" in status["actor_002"].error
    assert "re-run `cavatar prepare --force`" in status["actor_002"].error
    assert report.concurrency == 3 and "FAILED" in report.table()
    scaling = {a: json.loads(Path(status[a].summary).read_text())["scaling"] for a in ("actor_000", "actor_001")}
    assert scaling["actor_000"]["resources_per_worker"] == {"CPU": 0.5}  # each trainer has its own ScalingConfig
    assert scaling["actor_001"]["resources_per_worker"] == {"CPU": 0.25}
    a, b = (status[x].stages["vae"] for x in ("actor_000", "actor_001"))
    assert a["started"] < b["finished"] and b["started"] < a["finished"], "the two trainers did not overlap"
    for s in (a, b):
        assert s["steps"] == 4 and s["probe_loss"] < s["probe_loss_initial"]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "actor_000" / "vae" / "model", local_files_only=True)
    assert vae.config.latent_channels == 4


def test_trainer_paths_are_absolute_or_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train refuses a relative storage_path ("URI has empty scheme") and its workers resolve relative
    shard paths against their own working directory: `cavatar train --out runs/x` must still work."""
    from consistent_avatar.io import absolute_or_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_or_uri("runs/demo/train/a/checkpoints") == str(tmp_path / "runs/demo/train/a/checkpoints")
    assert absolute_or_uri(Path("runs/demo/shards")) == str(tmp_path / "runs/demo/shards")
    assert absolute_or_uri("s3://bucket/ckpt/a") == "s3://bucket/ckpt/a"
    assert absolute_or_uri("gs://bucket/shards") == "gs://bucket/shards"
    assert absolute_or_uri("/abs/ckpt") == "/abs/ckpt"


def test_only_small_local_actors_repeat_their_rows_within_an_epoch(tmp_path: Path) -> None:
    """Passes > 1 keep the train rows in the object store: local files up to REPEAT_MAX_BYTES only."""
    from consistent_avatar.training.actor import REPEAT_MAX_BYTES, _local_bytes

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 5)
    assert _local_bytes([str(a), str(b)]) == 15 <= REPEAT_MAX_BYTES
    assert _local_bytes([str(a), "s3://bucket/b.parquet"]) is None
    assert _local_bytes([str(tmp_path / "gone.parquet")]) is None and _local_bytes([]) is None
