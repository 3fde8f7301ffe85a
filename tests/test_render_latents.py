"""`cavatar render` taking stage 2's coarse-TSD latent from the shards (``latent_tsd_coarse``).

One synthetic actor (24 frames at 64²) prepared by the CLI with ``--vae`` pointing at its tiny
bundle's own ``vae/`` folder, so the shards' latents are provably the bundle's; a second bundle of
another seed has another VAE. One Ray Data run checks the choice end to end (recorded settings, the
manifest, the log, a resume under the other choice); the rest runs the stages in-process
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
from consistent_avatar.vae_identity import vae_dir_identity

pytestmark = pytest.mark.usefixtures("ray_local")

ACTOR = "actor_000"
TEST_FRAMES = [20, 21, 22, 23]  # 24 frames: the last 4 are the test split
LATENT_SHAPE = (4, 8, 8)  # the tiny preset: 64² / 8, 4 channels


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    make_tiny_bundle(root, ACTOR, seed=0)
    return root


@pytest.fixture(scope="module")
def other_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same actor's bundle of another seed: another (random) VAE."""
    root = tmp_path_factory.mktemp("other_bundles")
    make_tiny_bundle(root, ACTOR, seed=1)
    return root


@pytest.fixture(scope="module")
def shards(bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic actor prepared by the CLI with its bundle's VAE (`prepare --vae <bundle>/vae`)."""
    src, out = tmp_path_factory.mktemp("actors"), tmp_path_factory.mktemp("shards")
    assert main(["synth", "--out", str(src), "--actors", "1", "--frames", "24", "--res", "64"]) == 0
    vae = bundles / ACTOR / "vae"
    argv = ["prepare", "--sources", str(src), "--out", str(out), "--workers", "1", "--vae", str(vae)]
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


def test_prepare_records_the_identity_of_its_vae(shards: Path, bundles: Path) -> None:
    """By content, the way bundle.json hashes the VAE it stores: the bundle's recorded sha256 is the
    shards' recorded one, with no weights read at render time."""
    entry = load_manifest(shards)["actors"][ACTOR]
    identity = vae_dir_identity(bundles / ACTOR / "vae")
    assert identity is not None and entry["vae_identity"] == identity
    bundle = read_manifest(bundles / ACTOR)
    assert identity["weights_sha256"] == bundle.files["vae/diffusion_pytorch_model.safetensors"].sha256
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
    cases = [
        (shards, other_bundles, {}, "the shards' latents come from another VAE (weights sha256"),
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
    with pytest.raises(ConsistentAvatarError, match=r"not \(4, 4, 4\) float16 latents"):
        render_latents.decode(column, (4, 4, 4))
    lines = render_latents.summary({"a": "", "b": "why", "c": "why", "d": ""})
    assert lines == ["coarse TSD latents from the shards (no stage-2 VAE encode): a, d",
                     "coarse TSD latents encoded by the bundle's VAE for b, c: why"]
