"""`cavatar render` taking stage 2's coarse-TSD latent from the shards (``latent_tsd_coarse``).

The workflow as it is used: one synthetic actor (24 frames at 64², two shard files) prepared by the
CLI with ``--vae`` pointing at a "pretrained" VAE folder (float16 weights under diffusers' old
attention key names, other safetensors metadata, a config missing later diffusers keys), and a tiny
bundle built from that folder, which re-saves the VAE in float32 (other file bytes, the same tensors
as loaded): the shards' latents are provably the bundle's. A second bundle of another seed has
another VAE. One Ray Data run checks the choice end to end (recorded settings, the manifest, the
log, a resume under the other choice); the rest runs the stages in-process
(``render_units_locally``) or only the driver's checks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from bundle_factory import make_tiny_bundle

from consistent_avatar.bundle import read_manifest
from consistent_avatar.cli import main
from consistent_avatar.data.shards import ACTOR_MANIFEST_FILE, ACTORS_DIR, load_manifest, read_actor_table
from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.io import decode_png
from consistent_avatar.pipeline import ConsistentAvatarPipeline
from consistent_avatar.render import RenderConfig, read_render_manifest, render
from consistent_avatar.render import job as render_job
from consistent_avatar.render import latents as render_latents
from consistent_avatar.render import outputs as render_outputs
from consistent_avatar.bundle import file_sha256
from consistent_avatar.models import load_preset
from consistent_avatar.vae_identity import FORMAT, identity_problem, model_identity, vae_dir_identity

pytestmark = pytest.mark.usefixtures("ray_local")

ACTOR = "actor_000"
TEST_FRAMES = [20, 21, 22, 23]  # 24 frames: the last 4 are the test split
LATENT_SHAPE = (4, 8, 8)  # the tiny preset: 64² / 8, 4 channels


#: renamed by diffusers on load (its _fix_state_dict_keys_on_load): what older VAE files hold
OLD_ATTENTION_KEYS = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


@pytest.fixture(scope="module")
def pretrained_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE folder as pretrained SD VAEs ship: float16, old attention key names, tensors in another
    order, other metadata, a config written by an old diffusers (no quant-conv/mid-attention keys)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(7)
    vae = AutoencoderKL(**load_preset("tiny").vae_kwargs())
    state = {}
    for key, value in vae.state_dict().items():
        for new, old in OLD_ATTENTION_KEYS.items():
            key = key.replace(new, old)
        state[key] = value.half().contiguous()
    assert any(".proj_attn." in k for k in state)
    root = tmp_path_factory.mktemp("pretrained") / "vae"
    root.mkdir()
    save_file(dict(reversed(state.items())), root / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt", "origin": "a model hub"})
    later = ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv", "shift_factor", "force_upcast",
             "latents_mean", "latents_std", "sample_size")
    config = {k: v for k, v in vae.config.items() if not k.startswith("_") and k not in later}
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", **config}
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def bundles(pretrained_vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose VAE is the pretrained folder's, loaded and re-saved (save_pretrained, float32)."""
    root = tmp_path_factory.mktemp("bundles")
    make_tiny_bundle(root, ACTOR, seed=0, vae=pretrained_vae)
    return root


@pytest.fixture(scope="module")
def other_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same actor's bundle of another seed: another (random) VAE."""
    root = tmp_path_factory.mktemp("other_bundles")
    make_tiny_bundle(root, ACTOR, seed=1)
    return root


@pytest.fixture(scope="module")
def shards(pretrained_vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic actor prepared by the CLI with the pretrained VAE folder (`prepare --vae <pretrained>`)."""
    src, out = tmp_path_factory.mktemp("actors"), tmp_path_factory.mktemp("shards")
    assert main(["synth", "--out", str(src), "--actors", "1", "--frames", "24", "--res", "64"]) == 0
    argv = ["prepare", "--sources", str(src), "--out", str(out), "--workers", "1", "--vae", str(pretrained_vae)]
    assert main(argv) == 0
    return out


def _edited(shards: Path, tmp_path: Path, **entry: object) -> Path:
    """A copy of the shards whose manifest entry of ACTOR has ``entry`` set (None: removed)."""
    copy = tmp_path / "edited"
    shutil.copytree(shards, copy)
    m = json.loads((copy / "manifest.json").read_text())
    for key, value in entry.items():
        if value is None:
            m["actors"][ACTOR].pop(key, None)
        else:
            m["actors"][ACTOR][key] = value
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


def _frames(out: Path, row: str) -> np.ndarray:
    d = out / row / ACTOR / "frames"
    return np.stack([decode_png((d / f"{f:06d}.png").read_bytes()).astype(int) for f in TEST_FRAMES])


def _cpu_job(out: Path, plans: dict) -> render_job.JobSpec:
    return render_job.JobSpec(
        out=str(out), actors=plans, seed=0, use_gpu=False, dtype="float32", num_threads=1, compile=False,
        compile_cache=None, batch_size=4, refine=None, refiner=None, cache_size=1, verify=True,
    )


def _unit(row: str) -> dict[str, np.ndarray]:
    return {"row": np.array([row]), "actor": np.array([ACTOR]), "frames": np.array([json.dumps(TEST_FRAMES)])}


def _parts(shards: Path) -> list[Path]:
    return sorted((shards / ACTORS_DIR / ACTOR).glob("part-*.parquet"))


def _rewrite(part: Path, edit) -> None:
    import pyarrow.parquet as pq

    pq.write_table(edit(pq.read_table(part)), part)


def test_prepare_and_the_bundle_record_one_identity_for_a_re_saved_vae(
    shards: Path, bundles: Path, pretrained_vae: Path
) -> None:
    """The realistic workflow: the bundle's vae/ file is not the pretrained one (float32, new key names,
    other metadata), yet both record the identity of the same tensors as loaded — and so does a fresh
    load of each folder; bundle.json holds it, so a render reads no weights."""
    weights = "diffusion_pytorch_model.safetensors"
    assert file_sha256(pretrained_vae / weights) != file_sha256(bundles / ACTOR / "vae" / weights)
    from safetensors import safe_open

    with safe_open(str(bundles / ACTOR / "vae" / weights), "pt") as f:
        key = next(k for k in f.keys() if ".to_out.0." in k)
        assert f.get_tensor(key).dtype == torch.float32
    entry = load_manifest(shards)["actors"][ACTOR]
    bundle = read_manifest(bundles / ACTOR)
    identity = vae_dir_identity(pretrained_vae)
    assert identity["format"] == FORMAT and identity_problem(identity) == ""
    assert entry["vae_identity"] == identity == bundle.vae_identity == vae_dir_identity(bundles / ACTOR / "vae")
    assert entry["latent_shape"] == list(LATENT_SHAPE) and entry["tsd"] == bundle.tsd.model_dump()
    meta = json.loads((shards / ACTORS_DIR / ACTOR / ACTOR_MANIFEST_FILE).read_text())
    assert meta["vae_identity"] == identity


def test_a_render_with_the_bundles_own_vae_takes_the_shard_latents(
    shards: Path, bundles: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through Ray Data: the choice is logged, reported and recorded per row (not for baseline, which
    has no stage 2); a re-run under the other choice is refused like any other settings change."""
    out = tmp_path / "OUT"
    config = RenderConfig(rows=["full", "baseline"], batch_size=3, concurrency=1, video=False, progress=False)
    with caplog.at_level(logging.INFO, logger="consistent_avatar.render.job"):
        report = render(shards, bundles, out, config)
    assert report.ok, report.failed
    assert report.shard_latents == {ACTOR: ""}
    assert f"coarse TSD latents from the shards (no stage-2 VAE encode): {ACTOR}" in caplog.messages
    assert f"coarse TSD latents from the shards (no stage-2 VAE encode): {ACTOR}" in report.table()
    full = render_outputs.file_settings(out / "full" / ACTOR / "outputs.parquet")
    baseline = render_outputs.file_settings(out / "baseline" / ACTOR / "outputs.parquet")
    assert full["coarse_latent"] == "shards" and "coarse_latent" not in baseline
    m = read_render_manifest(out)
    assert m["settings"]["full"]["per_actor"][ACTOR]["coarse_latent"] == "shards"
    assert "coarse_latent" not in m["settings"]["baseline"]["per_actor"][ACTOR]

    off = config.model_copy(update={"shard_latents": False})
    with pytest.raises(ConsistentAvatarError, match=r"other settings \(.*coarse_latent 'shards' → None"):
        render(shards, bundles, out, off)
    again = render(shards, bundles, out, config)  # the same choice resumes: nothing left to render
    assert again.frames == 0 and again.kept == {"full": {ACTOR: 4}, "baseline": {ACTOR: 4}}


def test_the_pipeline_gets_the_shard_latents_and_renders_what_the_encode_path_renders(
    shards: Path, bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool actor hands the unit's stored latents to the pipeline as one batch on its device and
    dtype (and nothing under --no-shard-latents or in the baseline row); the frames are the encode
    path's up to the latents' fp16 (and the TSD's 8-bit) rounding."""
    calls: list[tuple[str, torch.Tensor | None]] = []
    real_call = ConsistentAvatarPipeline.__call__

    def spy(self, *a, coarse_latent=None, baseline=False, **k):
        calls.append(("baseline" if baseline else "full", coarse_latent))
        return real_call(self, *a, coarse_latent=coarse_latent, baseline=baseline, **k)

    monkeypatch.setattr(ConsistentAvatarPipeline, "__call__", spy)
    stored = read_actor_table(shards, ACTOR, split="test")
    expected = render_latents.decode(stored[render_latents.COLUMN], LATENT_SHAPE).astype(np.float32)
    images = {}
    for on in (True, False):
        config = RenderConfig(rows=["full", "baseline"], shard_latents=on, progress=False)
        _, plans = render_job._check_inputs(shards, str(bundles), config)
        plan = plans[ACTOR]
        assert (plan.latent_shape, plan.latent_note == "") == ((LATENT_SHAPE, True) if on else (None, False))
        out = tmp_path / f"OUT{int(on)}"
        spec = _cpu_job(out, plans)
        renderer = render_job.FrameRenderer(spec)
        for row in ("full", "baseline"):
            result = render_job.render_units_locally(spec, _unit(row), renderer)
            assert result["error"].tolist() == [""], result["error"]
            images[on, row] = _frames(out, row)
    (_, full_on), (_, base_on), (_, full_off), (_, base_off) = calls
    assert base_on is None and full_off is None and base_off is None
    assert full_on is not None and full_on.dtype == torch.float32 and full_on.device.type == "cpu"
    np.testing.assert_array_equal(full_on.numpy(), expected)
    np.testing.assert_array_equal(images[True, "baseline"], images[False, "baseline"])
    diff = np.abs(images[True, "full"] - images[False, "full"])
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_shard_latents_that_are_not_provably_the_bundles_are_not_used(
    shards: Path, bundles: Path, other_bundles: Path, tmp_path: Path
) -> None:
    """Another VAE, no latents, no recorded identity (older shards), another latent shape or TSD, the
    off switch, baseline only: every row encodes, records no coarse_latent, and the reason is reported."""
    old_format = {"weights_sha256": "ab" * 32, "config": "0123456789abcdef"}  # what 9d91791 recorded
    no_identity = tmp_path / "old_bundle"
    shutil.copytree(bundles, no_identity)
    m = json.loads((no_identity / ACTOR / "bundle.json").read_text())
    del m["vae_identity"]  # a bundle written before it was recorded: still reads
    (no_identity / ACTOR / "bundle.json").write_text(json.dumps(m))
    assert read_manifest(no_identity / ACTOR).vae_identity is None
    cases = [
        (shards, other_bundles, {}, "the shards' latents come from another VAE (weights sha256"),
        (_edited(shards, tmp_path / "e", vae_identity=old_format), bundles, {},
         "the shards predate the VAE content identity (they record a file hash"),
        (shards, no_identity, {}, "the bundle predates the VAE content identity (its bundle.json records no "
                                  "vae_identity): re-export it"),
        (shards, bundles, {"shard_latents": False}, "shard latents are turned off (--no-shard-latents)"),
        (shards, bundles, {"rows": ["baseline"]}, "no row runs stage 2"),
        (_edited(shards, tmp_path / "a", latent_shape=None), bundles, {}, "the shards hold no VAE latents"),
        (_edited(shards, tmp_path / "b", vae_identity=None), bundles, {}, "record no identity of the VAE"),
        (_edited(shards, tmp_path / "c", latent_shape=[4, 4, 4]), bundles, {}, "latents are (4, 4, 4)"),
        (_edited(shards, tmp_path / "d", tsd={"gain": 3.0}), bundles, {}, "other TSD settings"),
    ]
    for s, b, fields, reason in cases:
        _, plans = render_job._check_inputs(s, str(b), RenderConfig(progress=False, **fields))
        plan = plans[ACTOR]
        assert reason in plan.latent_note and plan.latent_shape is None, (reason, plan.latent_note)
        assert not any(rs.shard_latent or "coarse_latent" in rs.settings for rs in plan.rows.values())
        assert render_latents.summary({ACTOR: plan.latent_note}) == [
            f"coarse TSD latents encoded by the bundle's VAE for {ACTOR}: {plan.latent_note}"
        ]


def test_latents_decode_in_one_view_and_refuse_other_sizes() -> None:
    values = np.arange(2 * 4 * 2 * 2, dtype=np.float16).reshape(2, 4, 2, 2)
    column = pa.chunked_array([pa.array([v.tobytes() for v in part]) for part in (values[:1], values[1:])])
    np.testing.assert_array_equal(render_latents.decode(column, (4, 2, 2)), values)
    sliced = column.combine_chunks().slice(1)  # an array with an offset, as a filtered read may give
    np.testing.assert_array_equal(render_latents.decode(sliced, (4, 2, 2)), values[1:])
    with pytest.raises(ConsistentAvatarError, match=r"actor 'a', frames 7–8: .* values are 16 float16 values, "
                       r"not \(4, 4, 4\) latents .*cavatar prepare --force"):
        render_latents.decode(column, (4, 4, 4), actor="a", frames=[7, 8])
    lines = render_latents.summary({"a": "", "b": "why", "c": "why", "d": ""})
    assert lines == ["coarse TSD latents from the shards (no stage-2 VAE encode): a, d",
                     "coarse TSD latents encoded by the bundle's VAE for b, c: why"]


def test_the_vae_identity_is_of_the_tensors_as_loaded_and_the_latent_config() -> None:
    """The dtype rule (floating tensors hashed as float32: an upcast is the same VAE, a downcast is
    not), every tensor counts, and only the config keys that change the latent do."""
    from diffusers import AutoencoderKL

    preset = load_preset("tiny")
    torch.manual_seed(3)
    vae = AutoencoderKL(**preset.vae_kwargs())
    base = model_identity(vae)
    assert identity_problem(base) == "" and base["format"] == FORMAT
    half = AutoencoderKL(**preset.vae_kwargs())
    half.load_state_dict(vae.state_dict())
    half = half.half()
    assert model_identity(half)["tensors_sha256"] != base["tensors_sha256"]  # float32 → float16 rounds
    assert model_identity(half.float()) == model_identity(half)  # float16 → float32 is exact
    moved = AutoencoderKL(**preset.vae_kwargs())
    moved.load_state_dict(vae.state_dict())
    with torch.no_grad():
        moved.encoder.conv_in.bias[0] += 1e-3
    assert model_identity(moved)["tensors_sha256"] != base["tensors_sha256"]
    assert model_identity(moved)["config"] == base["config"]

    from consistent_avatar.vae_identity import config_fingerprint

    config = dict(vae.config)
    fp = config_fingerprint(config)
    assert fp == base["config"]
    bookkeeping = {**config, "_name_or_path": "/elsewhere", "_diffusers_version": "0.1", "sample_size": 1024,
                   "force_upcast": False, "latents_mean": [0.0] * 4}
    assert config_fingerprint(bookkeeping) == fp
    older = {k: v for k, v in config.items() if k not in ("mid_block_add_attention", "use_quant_conv", "shift_factor")}
    assert config_fingerprint(older) == fp  # defaults a later diffusers writes out
    assert config_fingerprint({**config, "scaling_factor": 0.13025}) != fp
    assert config_fingerprint({**config, "shift_factor": 0.1159}) != fp
    assert identity_problem(None) == "missing"
    assert identity_problem({"weights_sha256": "ab", "config": "c"}) == "file-hash"


def test_every_shard_file_must_hold_the_latent_column(shards: Path, bundles: Path, tmp_path: Path) -> None:
    """Planning reads every file's footer, not only the first: an actor with one file without the
    column (here the first, which holds no test frame) encodes, and the note names the file and the fix."""
    copy = _edited(shards, tmp_path / "a")
    parts = _parts(copy)
    assert len(parts) == 2
    _rewrite(parts[0], lambda t: t.drop_columns([render_latents.COLUMN]))
    _, plans = render_job._check_inputs(copy, str(bundles), RenderConfig(progress=False))
    plan = plans[ACTOR]
    assert plan.latent_shape is None and not any(rs.shard_latent for rs in plan.rows.values())
    assert parts[0].name in plan.latent_note and f"no {render_latents.COLUMN} column" in plan.latent_note
    assert "cavatar prepare --force" in plan.latent_note


def test_latent_errors_at_load_name_the_actor_the_frames_and_the_fix(
    shards: Path, bundles: Path, tmp_path: Path
) -> None:
    """Shards rewritten after the render was planned: a value of the wrong size, a file without the
    column — the load error says which actor and frames and what to do, not an Arrow error."""
    copy = _edited(shards, tmp_path / "a")
    _, plans = render_job._check_inputs(copy, str(bundles), RenderConfig(split="all", progress=False))
    plan = plans[ACTOR]
    assert plan.latent_shape == LATENT_SHAPE
    np.testing.assert_array_equal(
        render_job._read_unit(plan, [14, 15, 16, 17], LATENT_SHAPE)["coarse_latent"].shape, (4, *LATENT_SHAPE)
    )
    first, second = _parts(copy)

    def short_frame_21(t: pa.Table) -> pa.Table:
        values = t[render_latents.COLUMN].to_pylist()
        frames = t["frame"].to_pylist()
        values[frames.index(21)] = values[frames.index(21)][:64]
        i = t.schema.get_field_index(render_latents.COLUMN)
        return t.set_column(i, t.schema.field(i), pa.array(values, type=t.schema.field(i).type))

    _rewrite(second, short_frame_21)
    with pytest.raises(ConsistentAvatarError, match=r"actor 'actor_000', frame 21: .*32 float16 values, not "
                       r"\(4, 8, 8\) latents .*re-run `cavatar prepare --force"):
        render_job._read_unit(plan, TEST_FRAMES, LATENT_SHAPE)
    _rewrite(second, lambda t: t.drop_columns([render_latents.COLUMN]))
    for frames, span in (([20, 21, 22, 23], "frames 20–23"), ([14, 15, 16, 17], "frames 16–17")):
        with pytest.raises(ConsistentAvatarError, match=rf"actor '{ACTOR}', {span}: .*`cavatar prepare --force"):
            render_job._read_unit(plan, frames, LATENT_SHAPE)
    render_job._read_unit(plan, [14, 15], LATENT_SHAPE)  # the intact file still loads
    assert first.is_file()
