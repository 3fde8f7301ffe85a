"""`cavatar prepare` end to end on a local Ray: shards, manifest, atomicity, idempotence, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from consistent_avatar.cli import main
from consistent_avatar.data.layout import EMOTIONS
from consistent_avatar.data.prepare import PrepareConfig, default_test_frames, prepare
from consistent_avatar.data.shards import (
    ACTOR_MANIFEST_FILE,
    IMAGE_COLUMNS,
    actor_files,
    decode_images,
    frame_schema,
    load_manifest,
    read_actor_table,
    read_emotion_table,
)
from consistent_avatar.errors import ConsistentAvatarError

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def small_actors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny synthetic actors (40 frames, 64²) and the synthetic emotion database."""
    out = tmp_path_factory.mktemp("src")
    assert main(["synth", "--out", str(out), "--actors", "3", "--frames", "40", "--res", "64"]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_must_show_three_actors_from_the_cli(tmp_path: Path) -> None:
    """The issue's acceptance command: synth 3×120 frames at 128², then prepare."""
    d, s = tmp_path / "D", tmp_path / "S"
    assert main(["synth", "--out", str(d), "--actors", "3", "--frames", "120", "--res", "128"]) == 0
    assert main(["prepare", "--sources", str(d), "--out", str(s)]) == 0
    manifest = load_manifest(s)
    assert manifest["resolution"] == 128
    assert sorted(manifest["actors"]) == ["actor_000", "actor_001", "actor_002"]
    for name, entry in manifest["actors"].items():
        assert (entry["train"], entry["test"]) == (96, 24)
        table = read_actor_table(s, name)
        assert table.schema.equals(frame_schema(False), check_metadata=False)
        assert table["frame"].to_pylist() == list(range(120))
        assert table["split"].to_pylist() == ["train"] * 96 + ["test"] * 24
        for col in IMAGE_COLUMNS:
            imgs = decode_images(table[col][:3])
            assert imgs.shape == (3, 128, 128, 3) and imgs.dtype == np.uint8
        assert decode_images(table["mask"][:2], channels=1).shape == (2, 128, 128)
        assert set(table["emotion"].to_pylist()) <= set(EMOTIONS)
        assert np.isfinite(np.asarray(table["expression"].to_pylist())).all()
    labels, emb = read_emotion_table(s)
    assert labels == list(EMOTIONS) and emb.shape[0] == 8 and np.isfinite(emb).all()


def test_split_and_values_match_the_source(small_actors: Path, tmp_path: Path) -> None:
    from consistent_avatar.data.ingest import open_actor
    from consistent_avatar.tsd import TSDConfig, temporally_sensitive_detail, tsd_to_uint8

    import torch

    report = prepare([str(small_actors)], tmp_path / "S", PrepareConfig(test_frames=5))
    assert report.ok and sorted(report.prepared) == ["actor_000", "actor_001", "actor_002"]
    src = open_actor(small_actors / "actor_001")
    table = read_actor_table(tmp_path / "S", "actor_001")
    assert table["split"].to_pylist().count("test") == 5
    fb = src.read_frames([7])
    row = table.slice(7, 1)
    np.testing.assert_array_equal(decode_images(row["real_rgb"])[0], fb.real_rgb[0])
    np.testing.assert_array_equal(decode_images(row["coarse_normal"])[0], fb.coarse_normal[0])
    np.testing.assert_allclose(np.asarray(row["expression"].to_pylist()[0]), src.tracking().expression[7], rtol=1e-6)
    # The stored TSD is exactly the TSD of the stored coarse frame.
    coarse = torch.from_numpy(fb.coarse_rgb).permute(0, 3, 1, 2)
    expected = tsd_to_uint8(temporally_sensitive_detail(coarse, TSDConfig())).permute(0, 2, 3, 1).numpy()[0]
    np.testing.assert_array_equal(decode_images(row["tsd_coarse"])[0], expected)
    # A column selection without the sort/filter keys still sorts and filters, and returns only what was asked.
    test_only = read_actor_table(tmp_path / "S", "actor_001", split="test", columns=["pose"])
    assert test_only.column_names == ["pose"] and test_only.num_rows == 5
    assert test_only["pose"].to_pylist() == table.filter(pa.compute.equal(table["split"], "test"))["pose"].to_pylist()
    # The manifest names the emotion database by an absolute path (usable from any directory).
    manifest = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert Path(manifest["emotion"]["database"]).is_absolute()


def test_rerun_skips_up_to_date_actors_and_redoes_changed_ones(small_actors: Path, tmp_path: Path) -> None:
    src = _copy(small_actors, tmp_path / "src")
    out = tmp_path / "S"
    first = prepare([str(src)], out)
    assert first.ok and len(first.prepared) == 3
    files = {p: p.stat().st_mtime_ns for p in (out / "actors").rglob("*.parquet")}

    # An emotion database rewritten with the same content (as `cavatar synth` does) changes nothing.
    db = src / "emotion_db.parquet"
    db.write_bytes(db.read_bytes())
    again = prepare([str(src)], out)
    assert again.prepared == [] and sorted(again.skipped) == ["actor_000", "actor_001", "actor_002"]
    assert {p: p.stat().st_mtime_ns for p in (out / "actors").rglob("*.parquet")} == files

    exp = src / "actor_002" / "flame" / "exp" / "00003.txt"
    values = np.loadtxt(exp)
    values[0] += 0.5
    np.savetxt(exp, values)
    third = prepare([str(src)], out)
    assert third.prepared == ["actor_002"] and sorted(third.skipped) == ["actor_000", "actor_001"]
    changed = read_actor_table(out, "actor_002").slice(3, 1)["expression"].to_pylist()[0][0]
    assert changed == pytest.approx(values[0], rel=1e-6)

    forced = prepare([str(src)], out, PrepareConfig(force=True))
    assert len(forced.prepared) == 3


def test_corrupt_frame_fails_only_that_actor_and_keeps_its_previous_version(small_actors: Path, tmp_path: Path) -> None:
    src = _copy(small_actors, tmp_path / "src")
    out = tmp_path / "S"
    assert prepare([str(src)], out).ok
    before = sorted(p.name for p in actor_files(out, "actor_001"))

    (src / "actor_001" / "stage1" / "rgb" / "00021.png").write_bytes(b"not a png at all")
    rc = main(["prepare", "--sources", str(src), "--out", str(out), "--force"])
    assert rc == 1
    manifest = load_manifest(out)
    assert "actor_001" in manifest["last_run_failures"]
    assert "21" in manifest["last_run_failures"]["actor_001"]
    # The earlier complete version is still there, untouched; the others were re-prepared.
    assert sorted(p.name for p in actor_files(out, "actor_001")) == before
    assert set(manifest["actors"]) == {"actor_000", "actor_001", "actor_002"}
    assert not [p for p in (out / "actors").iterdir() if p.name.startswith(".")]


def test_structural_errors_are_reported_per_actor(small_actors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _copy(small_actors, tmp_path / "src")
    (src / "actor_000" / "flame" / "pose" / "00010.txt").write_text("1\n2\n3\n")  # 3 values, not 6
    os.remove(src / "actor_002" / "stage1" / "normal" / "00005.png")  # count mismatch
    rc = main(["prepare", "--sources", str(src), "--out", str(tmp_path / "S")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "actor_000" in err and "actor_002" in err
    manifest = load_manifest(tmp_path / "S")
    assert list(manifest["actors"]) == ["actor_001"]


def test_interrupted_run_leaves_nothing_visible(small_actors: Path, tmp_path: Path) -> None:
    out = tmp_path / "S"
    leftover = out / "actors" / ".actor_000.staging-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "part-0000000.parquet").write_bytes(b"half written")
    report = prepare([str(small_actors)], out, PrepareConfig(workers=1))
    assert report.ok
    assert not leftover.exists()
    for name in report.prepared:
        assert (out / "actors" / name / ACTOR_MANIFEST_FILE).is_file()


def test_video_layout_actor(small_actors: Path, tmp_path: Path) -> None:
    from consistent_avatar.synthetic import write_video_actor

    src = tmp_path / "videos"
    write_video_actor(small_actors / "actor_000", src / "vid_actor")
    shutil.copy(small_actors / "emotion_db.parquet", src / "emotion_db.parquet")
    report = prepare([str(src)], tmp_path / "S")
    assert report.ok and report.prepared == ["vid_actor"]
    table = read_actor_table(tmp_path / "S", "vid_actor")
    assert len(table) == 40 and decode_images(table["real_rgb"][:1]).shape == (1, 64, 64, 3)


def test_resize_and_mixed_resolutions(small_actors: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    _copy(small_actors, mixed)
    assert main(["synth", "--out", str(tmp_path / "big"), "--actors", "1", "--frames", "12", "--res", "96", "--seed", "7"]) == 0
    shutil.copytree(tmp_path / "big" / "actor_000", mixed / "big_actor")
    with pytest.raises(ConsistentAvatarError, match="--res"):
        prepare([str(mixed)], tmp_path / "S")
    report = prepare([str(mixed)], tmp_path / "S", PrepareConfig(resolution=32))
    assert report.ok
    assert decode_images(read_actor_table(tmp_path / "S", "big_actor")["tsd_real"][:1]).shape == (1, 32, 32, 3)


def test_missing_emotion_database_and_unknown_actor(small_actors: Path, tmp_path: Path) -> None:
    src = _copy(small_actors, tmp_path / "src")
    os.remove(src / "emotion_db.parquet")
    with pytest.raises(ConsistentAvatarError, match="emotion-db"):
        prepare([str(src)], tmp_path / "S")
    assert prepare([str(src)], tmp_path / "S", PrepareConfig(emotion_db=str(small_actors / "emotion_db.parquet"))).ok
    with pytest.raises(ConsistentAvatarError, match="actor_000"):
        actor_files(tmp_path / "S", "nobody")


def test_test_frames_larger_than_actor_fails_cleanly(small_actors: Path, tmp_path: Path) -> None:
    report = prepare([str(small_actors / "actor_000")], tmp_path / "S",
                     PrepareConfig(test_frames=40, emotion_db=str(small_actors / "emotion_db.parquet")))
    assert not report.ok and "no training frames" in report.failed["actor_000"]


def test_default_test_split_follows_the_paper() -> None:
    assert default_test_frames(3000) == 350
    assert default_test_frames(120) == 24
    assert default_test_frames(3) == 1


def test_vae_latents_and_local_clip(small_actors: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    from consistent_avatar.text_embedding import save_random_clip_text_encoder

    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=64)
    vae.save_pretrained(vae_dir)
    clip_dir = tmp_path / "clip"
    save_random_clip_text_encoder(clip_dir, hidden_size=32, seed=0)
    cfg = PrepareConfig(vae_path=str(vae_dir), clip_path=str(clip_dir), frames_per_task=20)
    report = prepare([str(small_actors / "actor_000")], tmp_path / "S",
                     cfg.model_copy(update={"emotion_db": str(small_actors / "emotion_db.parquet")}))
    assert report.ok, report.failed
    manifest = load_manifest(tmp_path / "S")
    assert manifest["latents"] is True and manifest["emotion"]["embedding_dim"] == 32
    meta_shape = (4, 32, 32)
    table = read_actor_table(tmp_path / "S", "actor_000")
    from consistent_avatar.data.shards import decode_latents

    lat = decode_latents(table["latent_real"].to_pylist()[:2], meta_shape)
    real = torch.from_numpy(decode_images(table["real_rgb"][:2])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = vae.encode(real).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(lat.astype(np.float32), ref.numpy(), atol=2e-3, rtol=1e-2)
    assert pq.read_schema(actor_files(tmp_path / "S", "actor_000")[0]).get_field_index("latent_tsd_coarse") >= 0
    # the VAE's identity by content (its tensors as loaded, as bundle.json records a bundle's VAE),
    # computed by the chunk writers from the model that made the latents
    from consistent_avatar.vae_identity import FORMAT, model_identity, vae_dir_identity

    identity = manifest["actors"]["actor_000"]["vae_identity"]
    assert identity == model_identity(vae) == vae_dir_identity(vae_dir)
    assert identity["format"] == FORMAT and len(identity["tensors_sha256"]) == 64
    meta = json.loads((tmp_path / "S" / "actors" / "actor_000" / "_actor.json").read_text())
    assert meta["vae_identity"] == identity
    # training takes these latents only from the VAE that made them, by content, not by path
    import dataclasses

    from consistent_avatar.training.data import inspect_actor, shard_latents_problem

    data = inspect_actor(tmp_path / "S", "actor_000", 64, 32)
    assert data.latent_vae_identity == identity and data.latent_shape == meta_shape
    assert shard_latents_problem(data, str(vae_dir)) == ""
    vae.save_pretrained(tmp_path / "copy")  # the same weights in another folder (a bundle's vae/, say)
    assert shard_latents_problem(data, str(tmp_path / "copy")) == ""
    assert "not a pretrained folder" in shard_latents_problem(data, None)
    torch.manual_seed(1)
    AutoencoderKL(**vae.config).save_pretrained(vae_dir)  # new weights at the path the shards name
    assert "another VAE" in shard_latents_problem(data, str(vae_dir))
    older = dataclasses.replace(data, latent_vae_identity=None)  # shards prepared before identities
    assert shard_latents_problem(older, str(vae_dir)) == ""  # their VAE folder's path, as before
    assert "come from the VAE at" in shard_latents_problem(older, str(tmp_path / "copy"))
    assert "no VAE latents" in shard_latents_problem(dataclasses.replace(data, latent_shape=None), str(vae_dir))
    shifted = tmp_path / "shifted"  # a VAE whose encode shifts: the stored latents (mean × scale) are not its
    shutil.copytree(tmp_path / "copy", shifted)
    cfg_json = json.loads((shifted / "config.json").read_text())
    (shifted / "config.json").write_text(json.dumps({**cfg_json, "shift_factor": 0.1}))
    assert "shift_factor" in shard_latents_problem(dataclasses.replace(older, latent_vae=str(shifted)), str(shifted))
