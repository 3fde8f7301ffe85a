"""Actor bundles (consistent_avatar.bundle): layout, round trip, storage URIs, versions, damage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_factory import tiny_models
from pyarrow import fs as pafs
from safetensors import safe_open
from safetensors.torch import save_file

from consistent_avatar import __version__
from consistent_avatar.bundle import (
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_FILE,
    EmotionTable,
    load_bundle,
    read_manifest,
    save_bundle,
)
from consistent_avatar.data.layout import EMOTIONS
from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.models import load_preset
from consistent_avatar.pipeline import ConsistentAvatarPipeline

B = 2


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def models(preset):
    return tiny_models(preset, seed=0)


@pytest.fixture(scope="module")
def emotions():
    emb = torch.randn(len(EMOTIONS), 768, generator=torch.Generator().manual_seed(3))
    return EmotionTable(EMOTIONS, emb)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, preset, models, emotions) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "actor-a"
    save_bundle(
        out,
        actor="actor-a",
        preset=preset,
        weights=models,
        emotion_labels=emotions.labels,
        emotion_table=emotions.embeddings.numpy(),
        training={"note": "test"},
    )
    return out


def _inputs(preset, seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    r = preset.resolution
    return {
        "coarse_rgb": (torch.rand(B, 3, r, r, generator=g) * 255).to(torch.uint8),
        "coarse_normal": torch.rand(B, 3, r, r, generator=g),
        "pose": torch.randn(B, 6, generator=g) * 0.1,
        "expression": torch.randn(B, 100, generator=g),
        "emotion": ["happy", "angry"],
    }


def _memory_pipeline(preset, models, emotions) -> ConsistentAvatarPipeline:
    return ConsistentAvatarPipeline(
        preset=preset,
        tsdm={"teacher": models["tsdm"], "lcm": models["lcm_tsdm"]},
        fcsd={"teacher": models["fcsd"], "lcm": models["lcm_fcsd"]},
        emotions=emotions,
    )


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle_dir, dst)
    return dst


def _edit_manifest(root: Path, **changes: object) -> None:
    data = json.loads((root / MANIFEST_FILE).read_text())
    data.update(changes)
    (root / MANIFEST_FILE).write_text(json.dumps(data))


# ---------------------------------------------------------------- layout


def test_layout_manifest_and_versions(bundle_dir: Path, preset, emotions) -> None:
    m = read_manifest(bundle_dir)
    assert m.schema_version == BUNDLE_SCHEMA_VERSION and m.actor == "actor-a"
    assert m.versions.package == __version__ and m.versions.torch == torch.__version__
    for rel in (
        "preset.json",
        "emotions.parquet",
        "null_context.safetensors",
        "vae/config.json",
        "tsdm/config.json",
        "tsdm/teacher.safetensors",
        "tsdm/lcm.safetensors",
        "fcsd/config.json",
        "fcsd/teacher.safetensors",
        "fcsd/lcm.safetensors",
        "training.json",
    ):
        assert (bundle_dir / rel).is_file() and rel in m.files, rel
    assert MANIFEST_FILE not in m.files
    # the VAE's identity by content, from the model saved: what a fresh load of vae/ gives
    from consistent_avatar.vae_identity import vae_dir_identity

    assert m.vae_identity is not None and m.vae_identity == vae_dir_identity(bundle_dir / "vae")
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left over
    assert set(m.stages["tsdm"].variants) == {"teacher", "lcm"}
    assert m.stages["fcsd"].lcm is not None and m.stages["fcsd"].lcm.num_ddim_timesteps == 50
    assert json.loads((bundle_dir / "preset.json").read_text()) == preset.model_dump(mode="json")
    # neither the VAE nor the null context is stored per stage
    with safe_open(str(bundle_dir / "fcsd/teacher.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith(("vae.", "null_context."))]
    assert any(k.startswith("controlnet.") for k in keys)


def test_student_file_holds_only_what_differs_from_the_teacher(bundle_dir: Path, models) -> None:
    m = read_manifest(bundle_dir)
    for stage in ("tsdm", "fcsd"):
        entry = m.stages[stage].variants["lcm"]
        assert entry.base == "teacher"
        with safe_open(str(bundle_dir / entry.file), "pt") as f:
            stored = set(f.keys())
        teacher = models[stage].state_dict()
        student = models[f"lcm_{stage}"].state_dict()
        differing = {
            k
            for k in student
            if not k.startswith(("vae.", "null_context.")) and not torch.equal(student[k], teacher[k])
        }
        assert stored == differing and 0 < len(stored) < entry.tensors


# ---------------------------------------------------------------- round trip


def test_load_restores_every_weight_exactly(bundle_dir: Path, models, emotions) -> None:
    bundle = load_bundle(bundle_dir)
    for key, (stage, variant) in {
        "tsdm": ("tsdm", "teacher"),
        "lcm_tsdm": ("tsdm", "lcm"),
        "fcsd": ("fcsd", "teacher"),
        "lcm_fcsd": ("fcsd", "lcm"),
    }.items():
        loaded = getattr(bundle, stage)[variant].state_dict()
        original = models[key].state_dict()
        assert loaded.keys() == original.keys()
        assert all(torch.equal(loaded[k], original[k]) for k in original), key
        assert not any(p.requires_grad for p in getattr(bundle, stage)[variant].parameters())
    assert bundle.tsdm["teacher"].vae is bundle.fcsd["lcm"].vae  # one VAE for every network
    assert bundle.emotions.labels == emotions.labels and torch.equal(
        bundle.emotions.embeddings, emotions.embeddings
    )
    assert bundle.training == {"note": "test"}


@pytest.mark.parametrize("sampler", ["lcm", "ddim"])
def test_bundle_renders_exactly_like_the_models_it_was_saved_from(
    bundle_dir, preset, models, emotions, sampler
) -> None:
    x = _inputs(preset)
    expected = _memory_pipeline(preset, models, emotions)(**x, sampler=sampler, num_steps=3, seed=7).frames
    got = ConsistentAvatarPipeline.from_bundle(bundle_dir)(**x, sampler=sampler, num_steps=3, seed=7).frames
    assert torch.equal(got, expected)


def test_file_uri_is_loaded_in_place(bundle_dir: Path, preset, models, emotions) -> None:
    bundle = load_bundle(bundle_dir.as_uri())
    assert bundle.root == bundle_dir and bundle.uri.startswith("file://")
    x = _inputs(preset, 1)
    expected = _memory_pipeline(preset, models, emotions)(**x, seed=1).frames
    assert torch.equal(ConsistentAvatarPipeline.from_bundle(bundle)(**x, seed=1).frames, expected)


def test_non_local_filesystem_uploads_then_downloads_into_a_cache(tmp_path, preset, models, emotions) -> None:
    (tmp_path / "remote").mkdir()
    remote = pafs.SubTreeFileSystem(str(tmp_path / "remote"), pafs.LocalFileSystem())
    save_bundle(
        "actors/a",
        actor="a",
        preset=preset,
        weights=models,
        emotion_labels=emotions.labels,
        emotion_table=emotions.embeddings,
        filesystem=remote,
    )
    assert (tmp_path / "remote/actors/a" / MANIFEST_FILE).is_file()
    cache = tmp_path / "cache"
    first = load_bundle("actors/a", filesystem=remote, cache_dir=cache)
    assert first.root.parent == cache and (first.root / "fcsd/lcm.safetensors").is_file()
    marker = first.root / "marker"
    marker.write_text("still the same copy")
    again = load_bundle("actors/a", filesystem=remote, cache_dir=cache)
    assert again.root == first.root and marker.is_file()  # unchanged manifest: the cache is reused
    x = _inputs(preset, 2)
    assert torch.equal(
        ConsistentAvatarPipeline.from_bundle(again)(**x).frames,
        _memory_pipeline(preset, models, emotions)(**x).frames,
    )
    save_bundle(  # a new version replaces the remote copy; the next load downloads it again
        "actors/a",
        actor="a",
        preset=preset,
        weights={"tsdm": models["tsdm"], "fcsd": models["fcsd"]},
        emotion_labels=emotions.labels,
        emotion_table=emotions.embeddings,
        sampling={"teacher_steps": 3},
        filesystem=remote,
    )
    assert not (tmp_path / "remote/actors/a/fcsd/lcm.safetensors").exists()  # nothing stale left
    newer = load_bundle("actors/a", filesystem=remote, cache_dir=cache)
    # ...into a folder of its own: the old copy, which another process may still be reading, stays.
    assert newer.root != first.root and newer.root.parent == cache and newer.sampling.teacher_steps == 3
    assert marker.is_file() and (first.root / "fcsd/lcm.safetensors").is_file()
    assert set(newer.fcsd) == {"teacher"} and not (newer.root / "fcsd/lcm.safetensors").exists()
    with pytest.raises(ConsistentAvatarError, match="no bundle at"):
        load_bundle("actors/nobody", filesystem=remote, cache_dir=cache)


def test_unknown_uri_scheme_is_a_clear_error() -> None:
    with pytest.raises(ConsistentAvatarError, match="storage URI"):
        load_bundle("nosuchscheme://bucket/actor")


def test_save_from_training_files_and_preset_vae(tmp_path, preset, models, emotions) -> None:
    """The trainer hands over safetensors files (no vae.* keys) and lets the VAE come from the preset."""
    files = {}
    for key, model in models.items():
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("vae.")}
        save_file(state, str(tmp_path / f"{key}.safetensors"))
        files[key] = str(tmp_path / f"{key}.safetensors")
    out = save_bundle(
        tmp_path / "b",
        actor="b",
        preset=preset,
        weights=files,
        emotion_labels=emotions.labels,
        emotion_table=emotions.embeddings.numpy(),
        seed=0,
    )
    bundle = load_bundle(out, variants=("teacher",))
    assert set(bundle.tsdm) == {"teacher"} and set(bundle.fcsd) == {"teacher"}
    for stage in ("tsdm", "fcsd"):
        loaded, original = getattr(bundle, stage)["teacher"].state_dict(), models[stage].state_dict()
        assert all(torch.equal(loaded[k], original[k]) for k in original), stage  # incl. vae.* from seed 0


def test_lcm_only_bundle_and_variant_selection(tmp_path, preset, models, emotions) -> None:
    out = save_bundle(
        tmp_path / "lcm-only",
        actor="c",
        preset=preset,
        weights={"lcm_tsdm": models["lcm_tsdm"], "lcm_fcsd": models["lcm_fcsd"]},
        emotion_labels=emotions.labels,
        emotion_table=emotions.embeddings,
    )
    m = read_manifest(out)
    assert m.stages["fcsd"].variants["lcm"].base is None
    bundle = load_bundle(out)
    assert set(bundle.tsdm) == {"lcm"}
    with pytest.raises(ConsistentAvatarError, match="no \\['teacher'\\] weights"):
        load_bundle(out, variants=("teacher",))
    pipe = ConsistentAvatarPipeline.from_bundle(bundle)
    with pytest.raises(ConsistentAvatarError, match="teacher weights"):
        pipe(**_inputs(preset), without_lcm=True)


# ---------------------------------------------------------------- refused saves


def test_save_refuses_bad_arguments(tmp_path, preset, models, emotions) -> None:
    common = {
        "actor": "x",
        "preset": preset,
        "emotion_labels": emotions.labels,
        "emotion_table": emotions.embeddings,
    }
    with pytest.raises(ConsistentAvatarError, match="unknown weights"):
        save_bundle(tmp_path / "x", weights={**models, "stage9": models["tsdm"]}, **common)
    with pytest.raises(ConsistentAvatarError, match="nothing for stage fcsd"):
        save_bundle(tmp_path / "x", weights={"tsdm": models["tsdm"]}, **common)
    with pytest.raises(ConsistentAvatarError, match="needs a FCSD"):
        save_bundle(tmp_path / "x", weights={"tsdm": models["tsdm"], "fcsd": models["tsdm"]}, **common)
    wrong = {k: v for k, v in models["tsdm"].state_dict().items()}
    with pytest.raises(ConsistentAvatarError, match="do not fit the fcsd architecture"):
        save_bundle(tmp_path / "x", weights={"tsdm": models["tsdm"], "fcsd": wrong}, **common)
    other_null = {**models["fcsd"].state_dict(), "null_context.context": torch.zeros(4, 32)}
    with pytest.raises(ConsistentAvatarError, match="different null contexts"):
        save_bundle(tmp_path / "x", weights={"tsdm": models["tsdm"], "fcsd": other_null}, **common)
    with pytest.raises(ConsistentAvatarError, match="768|dims"):
        save_bundle(
            tmp_path / "x", weights=models, **{**common, "emotion_table": np.zeros((8, 5), np.float32)}
        )
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.staging-*"))


def test_save_replaces_an_existing_bundle_atomically(tmp_path, preset, models, emotions) -> None:
    kw = {
        "actor": "r",
        "preset": preset,
        "weights": models,
        "emotion_labels": emotions.labels,
        "emotion_table": emotions.embeddings,
    }
    first = read_manifest(save_bundle(tmp_path / "r", **kw))
    (tmp_path / "r" / "stale-file").write_text("from the old version")
    second = read_manifest(save_bundle(tmp_path / "r", **kw, sampling={"num_steps": 2}))
    assert second.sampling.num_steps == 2 and first.sampling.num_steps == 4
    assert not (tmp_path / "r" / "stale-file").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


# ---------------------------------------------------------------- refused loads


@pytest.mark.parametrize(
    ("version", "advice"), [(0, "export the actor again"), (BUNDLE_SCHEMA_VERSION + 1, "upgrade")]
)
def test_other_schema_versions_are_refused_with_advice(bundle_dir, tmp_path, version, advice) -> None:
    root = _copy(bundle_dir, tmp_path)
    _edit_manifest(root, schema_version=version)
    with pytest.raises(ConsistentAvatarError, match=f"schema version {version}.*{advice}"):
        load_bundle(root)


def test_missing_manifest_or_directory(bundle_dir, tmp_path) -> None:
    root = _copy(bundle_dir, tmp_path)
    (root / MANIFEST_FILE).unlink()
    with pytest.raises(ConsistentAvatarError, match="not an actor bundle"):
        load_bundle(root)
    with pytest.raises(ConsistentAvatarError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "rel", ["fcsd/teacher.safetensors", "vae/diffusion_pytorch_model.safetensors", "emotions.parquet"]
)
def test_missing_files_are_named(bundle_dir, tmp_path, rel) -> None:
    root = _copy(bundle_dir, tmp_path)
    (root / rel).unlink()
    with pytest.raises(ConsistentAvatarError, match=f"missing {rel}"):
        load_bundle(root)


def test_corrupt_and_truncated_weights_are_detected(bundle_dir, tmp_path) -> None:
    root = _copy(bundle_dir, tmp_path)
    path = root / "tsdm/lcm.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ConsistentAvatarError, match="tsdm/lcm.safetensors is corrupt"):
        load_bundle(root)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ConsistentAvatarError, match="truncated"):
        load_bundle(root, verify=False)
    # a damaged header of the right size, with checksums off: safetensors' own error, made clear
    header = bytearray((bundle_dir / "tsdm/lcm.safetensors").read_bytes())
    header[:8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(header))
    with pytest.raises(ConsistentAvatarError, match="not a readable safetensors file"):
        load_bundle(root, verify=False)


def test_weights_that_do_not_fit_the_stored_architecture(bundle_dir, tmp_path) -> None:
    root = _copy(bundle_dir, tmp_path)
    config = json.loads((root / "tsdm/config.json").read_text())
    config["unet"]["block_out_channels"] = [16, 32]
    (root / "tsdm/config.json").write_text(json.dumps(config))
    files = json.loads((root / MANIFEST_FILE).read_text())["files"]
    data = (root / "tsdm/config.json").read_bytes()
    files["tsdm/config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _edit_manifest(root, files=files)  # a consistent manifest: the check that fails is the fit
    with pytest.raises(
        ConsistentAvatarError, match="teacher.safetensors does not fit the stored architecture"
    ):
        load_bundle(root)


def test_bad_load_arguments(bundle_dir) -> None:
    with pytest.raises(ConsistentAvatarError, match="variants"):
        load_bundle(bundle_dir, variants=("student",))  # type: ignore[arg-type]
    with pytest.raises(ConsistentAvatarError, match="dtype"):
        load_bundle(bundle_dir, dtype=torch.int8)


def test_bf16_load(bundle_dir, preset) -> None:
    bundle = load_bundle(bundle_dir, dtype=torch.bfloat16, variants=("lcm",))
    assert next(bundle.fcsd["lcm"].unet.parameters()).dtype == torch.bfloat16
    assert bundle.vae.dtype == torch.bfloat16 and bundle.emotions.embeddings.dtype == torch.bfloat16
    out = ConsistentAvatarPipeline.from_bundle(bundle)(**_inputs(preset), num_steps=2)
    assert out.frames.dtype == torch.float32 and bool(torch.isfinite(out.frames).all())
    assert out.settings["dtype"] == "bfloat16"


# ---------------------------------------------------------------- emotion table


def test_emotion_table_checks(emotions) -> None:
    with pytest.raises(ConsistentAvatarError, match="unique"):
        EmotionTable(("a", "a"), torch.zeros(2, 4))
    with pytest.raises(ConsistentAvatarError, match="2 labels but 3"):
        EmotionTable(("a", "b"), torch.zeros(3, 4))
    with pytest.raises(ConsistentAvatarError, match="NaN"):
        EmotionTable(("a",), torch.full((1, 4), float("nan")))
    assert torch.equal(emotions.lookup("sad", 3), emotions.embeddings[[6, 6, 6]])
