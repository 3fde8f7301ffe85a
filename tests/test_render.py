"""`cavatar render` over real shards (`cavatar synth` + `prepare`, 64²) with tiny random bundles.

Three Ray Data runs share the module (pool-actor start-up dominates on 2 cores): ``first`` renders every
ablation row of three actors, one of whose bundles is corrupt; the resume test re-runs it through the
CLI after deleting outputs and repairing that bundle; a third one has a unit fail in the load stage and
another in the write stage. Everything else (checks, resource sizing, atomicity, determinism) runs
in-process, without Ray work (the stages' code chained by ``render_units_locally``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from actor_factory import synthetic_shards
from bundle_factory import make_tiny_bundle

from consistent_avatar.bundle import EmotionTable
from consistent_avatar.cli import main
from consistent_avatar.data.shards import decode_images, read_actor_table
from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.io import decode_png
from consistent_avatar.models.sampling import SchedulerKind
from consistent_avatar.pipeline import ConsistentAvatarPipeline
from consistent_avatar.render import ROWS, RenderConfig, read_outputs, read_render_manifest, render
from consistent_avatar.render import config as render_config
from consistent_avatar.render import job as render_job
from consistent_avatar.render import outputs as render_outputs
from consistent_avatar.render.cli import command_line, config_from_args

pytestmark = pytest.mark.usefixtures("ray_local")

ACTORS = ["actor_000", "actor_001", "actor_002"]
GOOD = ACTORS[:2]
BROKEN = "actor_002"
TEST_FRAMES = [20, 21, 22, 23]  # 24 frames: the last min(350, 24 // 5) = 4 are the test split
# one pool actor: on 2 busy cores a second one mostly costs its start-up (torch import, bundle loads);
# three actors through a cache of two also exercises the LRU.
FIRST = {"rows": list(ROWS), "teacher_steps": 2, "batch_size": 3, "concurrency": 1, "progress": False}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic actors, 24 frames at 64² (the tiny preset's resolution), prepared by the CLI."""
    return synthetic_shards(tmp_path_factory.mktemp("actors"), tmp_path_factory.mktemp("shards"), 3, 24, 1)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle per actor; actor_002's stage-3 weights are damaged after export (its manifest, preset
    and emotions stay intact, so only loading it in a pool actor finds out)."""
    root = tmp_path_factory.mktemp("bundles")
    for i, actor in enumerate(ACTORS):
        make_tiny_bundle(root, actor, seed=i)
    weights = root / BROKEN / "fcsd" / "teacher.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def first(shards: Path, bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, render_job.RenderReport]:
    out = tmp_path_factory.mktemp("render") / "OUT"
    report = render(shards, bundles, out, RenderConfig(**FIRST), command="test first run")
    return out, report


def _pngs(out: Path, row: str, actor: str) -> list[str]:
    d = out / row / actor / "frames"
    return sorted(p.name for p in d.glob("*.png")) if d.is_dir() else []


def _test_rows(shards: Path, actor: str):
    return read_actor_table(shards, actor, split="test")


# ---------------------------------------------------------------------------------------------
# The first run: layout, parquet, manifest, rows, mp4, a failing actor
# ---------------------------------------------------------------------------------------------


def test_layout_parquet_and_manifest(first, shards: Path, bundles: Path) -> None:
    out, report = first
    names = [f"{f:06d}.png" for f in TEST_FRAMES]
    for row in ROWS:
        for actor in GOOD:
            assert _pngs(out, row, actor) == names, (row, actor)
            table = pq.read_table(out / row / actor / "outputs.parquet")
            assert table.schema.equals(render_outputs.outputs_schema(), check_metadata=False)
            assert sorted(p.name for p in (out / row / actor).glob("outputs*.parquet")) == ["outputs.parquet"]
            assert table["frame"].to_pylist() == TEST_FRAMES
            assert set(table["actor"].to_pylist()) == {actor} and set(table["row"].to_pylist()) == {row}
            assert set(table["split"].to_pylist()) == {"test"}
            assert table["png"].to_pylist() == [f"{row}/{actor}/frames/{n}" for n in names]
            assert all((out / p).is_file() for p in table["png"].to_pylist())
            assert table["seed"].to_pylist() == TEST_FRAMES  # seed 0 + frame
            assert table["batch_size"].to_pylist() == [3, 3, 3, 1]  # batches of ≤ 3, one actor each
            timings = [json.loads(t) for t in table["timings"].to_pylist()]
            assert all(t["total"] > 0 and "stage3" in t for t in timings)
            assert ("stage2" in timings[0]) != (row == "baseline")
            seconds = table["seconds"].to_pylist()
            assert seconds[0] == pytest.approx(timings[0]["total"] / 3) and seconds[3] == pytest.approx(timings[3]["total"])
            expected = ("ddim", 2) if row == "without_lcm" else ("lcm", 4)
            assert set(zip(table["sampler"].to_pylist(), table["steps"].to_pylist())) == {expected}
            img = decode_png((out / table["png"][0].as_py()).read_bytes())
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            assert (out / row / actor / f"{actor}.mp4").is_file()
    assert not [p for p in out.rglob(".*") if p.name != render_job.LOCK_FILE]  # no temporary leftovers

    m = read_render_manifest(out)
    assert m is not None and m["schema_version"] == 1 and m["split"] == "test"
    assert m["shards"] == str(shards) and m["bundles"] == str(bundles)
    assert m["rows"] == list(ROWS) and m["command"] == "test first run" and m["created_at"]
    assert {"hostname", "python", "torch", "ray"} <= set(m["machine"])
    for actor in GOOD:
        assert m["actors"][actor]["frames"] == 4 and m["actors"][actor]["resolution"] == 64
        assert m["actors"][actor]["rendered"] == {row: 4 for row in ROWS} and not m["actors"][actor]["failed"]
    assert m["settings"]["full"]["sampler"] == "lcm" and m["settings"]["full"]["steps"] == 4
    assert m["settings"]["without_lcm"]["sampler"] == "ddim" and m["settings"]["without_lcm"]["steps"] == 2
    for row, switches in ROWS.items():
        assert {k: m["settings"][row][k] for k in render_config.SWITCHES} == render_config.row_switches(row)
    assert sum(sum(v.values()) for v in report.rendered.values()) == report.frames == 2 * 5 * 4


def test_a_failing_actor_does_not_affect_the_others(first) -> None:
    out, report = first
    assert not report.ok and list(report.failed) == [BROKEN]
    assert "corrupt" in report.failed[BROKEN] and "fcsd/teacher.safetensors" in report.failed[BROKEN]
    for row in ROWS:
        assert _pngs(out, row, BROKEN) == []
        assert not (out / row / BROKEN / f"{BROKEN}.mp4").exists()
        assert report.missing[row] == {"actor_000": 0, "actor_001": 0, BROKEN: 4}
    m = read_render_manifest(out)
    assert m["actors"][BROKEN]["rendered"] == {row: 0 for row in ROWS}
    assert set(m["actors"][BROKEN]["failed"]) == set(ROWS)
    assert "FAILED actor_002" in report.table()


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding: conv kernels may sum in another order for another batch size, so
    a rare pixel lands one 8-bit level away."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_pngs_are_the_pipeline_output_whatever_the_batching(first, shards: Path, bundles: Path) -> None:
    """The job's PNGs are exactly what the pipeline renders for the same batches (3 + 1 frames, seeds
    0 + frame), and, up to float rounding, what it renders for any other batching (all 4 at once)."""
    out, _ = first
    actor = "actor_001"
    rows = _test_rows(shards, actor)
    pipe = ConsistentAvatarPipeline.from_bundle(bundles / actor)
    x = {
        "coarse_rgb": torch.from_numpy(decode_images(rows["coarse_rgb"])).permute(0, 3, 1, 2),
        "coarse_normal": torch.from_numpy(decode_images(rows["coarse_normal"])).permute(0, 3, 1, 2),
        "pose": torch.tensor(rows["pose"].to_pylist()),
        "expression": torch.tensor(rows["expression"].to_pylist()),
        "emotion": rows["emotion"].to_pylist(),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pool actors (1 CPU each): CPU kernels sum per thread count
    try:
        _compare_with_pipeline(out, actor, pipe, x)
    finally:
        torch.set_num_threads(threads)


def _compare_with_pipeline(out: Path, actor: str, pipe: ConsistentAvatarPipeline, x: dict) -> None:
    for row in ("full", "baseline"):
        got = np.stack([decode_png((out / row / actor / "frames" / f"{f:06d}.png").read_bytes()) for f in TEST_FRAMES])
        same = [
            pipe(**{k: v[s] for k, v in x.items()}, seed=TEST_FRAMES[s], **ROWS[row]).frames_uint8().numpy()
            for s in (slice(0, 3), slice(3, 4))
        ]
        np.testing.assert_array_equal(got, np.concatenate(same), err_msg=row)
        _close(got, pipe(**x, seed=TEST_FRAMES, **ROWS[row]).frames_uint8().numpy())
        other_seeds = pipe(**x, seed=[f + 1 for f in TEST_FRAMES], **ROWS[row]).frames_uint8().numpy()
        assert not np.array_equal(got, other_seeds)


def test_every_ablation_row_changes_the_frames(first) -> None:
    out, _ = first
    for actor in GOOD:
        full = [decode_png(p.read_bytes()) for p in sorted((out / "full" / actor / "frames").glob("*.png"))]
        for row in ROWS:
            if row == "full":
                continue
            other = [decode_png(p.read_bytes()) for p in sorted((out / row / actor / "frames").glob("*.png"))]
            assert all(not np.array_equal(a, b) for a, b in zip(full, other)), (row, actor)
    # the two actors' bundles differ (seeds 0 and 1), so do their frames
    assert (out / "full/actor_000/frames/000020.png").read_bytes() != (out / "full/actor_001/frames/000020.png").read_bytes()


def test_mp4_is_coarse_ours_real_side_by_side(first, shards: Path) -> None:
    import decord

    out, _ = first
    actor = "actor_000"
    vr = decord.VideoReader(str(out / "full" / actor / f"{actor}.mp4"))
    assert len(vr) == 4 and vr.get_avg_fps() == pytest.approx(25.0)
    video = vr.get_batch(list(range(4))).asnumpy()
    assert video.shape == (4, 64, 3 * 64, 3)
    rows = _test_rows(shards, actor)
    coarse, real = decode_images(rows["coarse_rgb"]), decode_images(rows["real_rgb"])
    ours = np.stack([decode_png(p.read_bytes()) for p in sorted((out / "full" / actor / "frames").glob("*.png"))])
    thirds = {"coarse": (coarse, video[:, :, :64]), "ours": (ours, video[:, :, 64:128]), "real": (real, video[:, :, 128:])}
    errors = {k: np.abs(a.astype(float) - b.astype(float)).mean() for k, (a, b) in thirds.items()}
    wrong = np.abs(real.astype(float) - video[:, :, :64].astype(float)).mean()
    # mp4v is lossy (random-weight frames are noise, the hardest case): each third is close to its
    # source, and clearly closer than to another source
    assert all(e < 25 for e in errors.values()), errors
    assert errors["coarse"] < wrong / 2, (errors, wrong)


# ---------------------------------------------------------------------------------------------
# Resume (second Ray run, through the CLI)
# ---------------------------------------------------------------------------------------------


def test_shards_as_a_file_uri_render_the_same_frames(first, shards: Path, bundles: Path, tmp_path: Path) -> None:
    """The Ray job reads shards given as a URI through the pyarrow filesystem the driver resolved:
    the same frames, PNGs and mp4 as the plain-path run (one actor, one row: a small render)."""
    first_out, _ = first
    uri = shards.as_uri()
    out = tmp_path / "OUT"
    config = RenderConfig(**{**FIRST, "rows": ["full"]}, actors=["actor_000"])
    report = render(uri, bundles, out, config, command="test uri run")
    assert not report.failed and report.rendered == {"full": {"actor_000": len(TEST_FRAMES)}}
    assert read_render_manifest(out)["shards"] == uri
    names = _pngs(out, "full", "actor_000")
    assert names == _pngs(first_out, "full", "actor_000") and len(names) == len(TEST_FRAMES)
    for name in names:
        a = decode_png((out / "full" / "actor_000" / "frames" / name).read_bytes())
        b = decode_png((first_out / "full" / "actor_000" / "frames" / name).read_bytes())
        np.testing.assert_array_equal(a, b)
    assert report.videos == [out / "full" / "actor_000" / "actor_000.mp4"] and report.videos[0].stat().st_size > 0


def _drop_row(path: Path, frame: int) -> None:
    """Rewrite a parquet file without ``frame``'s row (keeping the settings metadata)."""
    table = pq.read_table(path)
    keep = pa.compute.not_equal(table["frame"], frame)
    pq.write_table(table.filter(keep), path)


def test_resume_renders_only_what_is_missing(first, shards: Path, bundles: Path, tmp_path: Path) -> None:
    src, _ = first
    out = tmp_path / "OUT"
    shutil.copytree(src, out)
    fixed = tmp_path / "bundles"
    shutil.copytree(bundles, fixed)
    shutil.rmtree(fixed / BROKEN)
    make_tiny_bundle(fixed, BROKEN, seed=2)

    deleted_png = out / "full/actor_000/frames/000021.png"
    original = deleted_png.read_bytes()
    deleted_png.unlink()
    _drop_row(out / "baseline/actor_001/outputs.parquet", 22)
    (out / "full/actor_000/frames/.000022.png.tmp-deadbeef").write_bytes(b"half a png")  # a killed write
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    # the bundles moved (a copy): same content, so nothing rendered before is stale
    argv = ["render", "--shards", str(shards), "--bundles", str(fixed), "--out", str(out), "--rows", "all",
            "--teacher-steps", "2", "--batch-size", "3", "--concurrency", "1", "--no-progress"]
    assert main(argv) == 0

    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    changed = sorted(str(p.relative_to(out)) for p in after if before.get(p) != after[p])
    expected = ["baseline/actor_001/frames/000022.png", "full/actor_000/frames/000021.png"]
    expected += [f"{row}/{BROKEN}/frames/{f:06d}.png" for row in ROWS for f in TEST_FRAMES]
    assert changed == sorted(expected)
    _close(decode_png(deleted_png.read_bytes()), decode_png(original))  # same seed + frame: the same frame
    assert not list(out.rglob(".*.tmp-*"))
    for row in ROWS:
        for actor in ACTORS:
            assert read_outputs(out, row, actor)["frame"].to_pylist() == TEST_FRAMES
            assert (out / row / actor / f"{actor}.mp4").is_file()
    m = read_render_manifest(out)
    assert all(not m["actors"][a]["failed"] for a in ACTORS)
    assert m["command"].startswith("cavatar render --shards")

    # the same OUT with other settings is refused, naming what differs; nothing is touched
    with pytest.raises(ConsistentAvatarError, match=r"(?s)other settings \(steps 4 → 2\).*--force"):
        render(shards, fixed, out, RenderConfig(rows=["full"], steps=2, progress=False))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == after
    with pytest.raises(ConsistentAvatarError, match=r"holds renders of the 'test' split"):
        render(shards, fixed, out, RenderConfig(split="train", progress=False))


# ---------------------------------------------------------------------------------------------
# A unit failing in the load or the write stage (third Ray run)
# ---------------------------------------------------------------------------------------------


def _corrupt_png(shards: Path, actor: str, frame: int, column: str, tmp_path: Path) -> Path:
    """A copy of ``shards`` whose ``column`` PNG of ``frame`` of ``actor`` is not a PNG any more."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    for path in (copy / "actors" / actor).glob("part-*.parquet"):
        table = pq.read_table(path)
        frames = table["frame"].to_pylist()
        if frame not in frames:
            continue
        values = table[column].to_pylist()
        values[frames.index(frame)] = b"not a png"
        i = table.schema.get_field_index(column)
        table = table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))
        pq.write_table(table, path)
        return copy
    raise AssertionError(f"frame {frame} of {actor} is in no shard file")


def test_a_failure_in_the_load_or_write_stage_fails_only_its_unit(shards: Path, bundles: Path, tmp_path: Path) -> None:
    """Units of 2 frames: actor_000's second unit cannot be loaded (a corrupt input PNG: load stage),
    actor_001's first cannot be written (a folder where a PNG goes: write stage). Each becomes its
    unit's error with today's message; every other unit completes, and nothing half-written counts."""
    broken = _corrupt_png(shards, "actor_000", 22, "coarse_normal", tmp_path)
    out = tmp_path / "OUT"
    blocker = out / "full" / "actor_001" / "frames" / "000021.png"
    (blocker / "in_the_way").mkdir(parents=True)
    config = RenderConfig(actors=GOOD, batch_size=2, concurrency=1, progress=False)
    report = render(broken, bundles, out, config, command="test stage failures")

    assert report.frames == 4 and report.rendered["full"] == {"actor_000": 2, "actor_001": 2}
    assert report.missing["full"] == {"actor_000": 2, "actor_001": 2} and set(report.failed) == set(GOOD)
    assert "2 of 4 frames missing: corrupt PNG bytes in a shard" in report.failed["actor_000"]
    assert "2 of 4 frames missing: IsADirectoryError" in report.failed["actor_001"]
    assert read_outputs(out, "full", "actor_000")["frame"].to_pylist() == [20, 21]
    assert read_outputs(out, "full", "actor_001")["frame"].to_pylist() == [22, 23]
    # the failed write's first PNG landed, but without its parquet row it does not count
    assert (out / "full" / "actor_001" / "frames" / "000020.png").is_file()
    assert not any((out / "full" / a / f"{a}.mp4").exists() for a in GOOD)  # incomplete rows: no video
    m = read_render_manifest(out)
    assert m["actors"]["actor_000"]["rendered"] == {"full": 2} and m["actors"]["actor_000"]["failed"] == {"full": "2 frames missing"}


# ---------------------------------------------------------------------------------------------
# Bad input: refused before any Ray work
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_ray_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.data

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("Ray Data work started although the inputs are bad")

    monkeypatch.setattr(ray.data, "from_items", refuse)


def _edited_shards(shards: Path, tmp_path: Path, resolution: int) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["resolution"] = resolution
    for entry in m["actors"].values():
        entry["resolution"] = resolution
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


def test_bad_input_is_refused_before_any_ray_work(no_ray_work, shards: Path, bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    cfg = RenderConfig(actors=GOOD, progress=False)

    with pytest.raises(ConsistentAvatarError, match=r"holds no manifest\.json.*cavatar prepare"):
        render(tmp_path / "nowhere", bundles, out, cfg)
    with pytest.raises(ConsistentAvatarError, match=r"\['nobody'\] are not in .*prepared actors: actor_000, actor_001, actor_002"):
        render(shards, bundles, out, RenderConfig(actors=["actor_000", "nobody"]))

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copytree(bundles / "actor_000", partial / "actor_000")
    with pytest.raises(ConsistentAvatarError, match=rf"actor 'actor_001': bundle {re.escape(str(partial / 'actor_001'))} does not exist"):
        render(shards, partial, out, cfg)

    shutil.copytree(bundles / "actor_000", partial / "actor_001")  # another actor's bundle
    with pytest.raises(ConsistentAvatarError, match=r"is the bundle of actor 'actor_000', not 'actor_001'"):
        render(shards, partial, out, cfg)

    with pytest.raises(ConsistentAvatarError, match=r"renders 64² \(preset 'tiny'\) but the shards are 32²: .*--res 64"):
        render(_edited_shards(shards, tmp_path, 32), bundles, out, cfg)

    odd = tmp_path / "odd"
    make_tiny_bundle(odd, "actor_000", emotions=EmotionTable(("calm", "stormy"), torch.randn(2, 768)))
    with pytest.raises(ConsistentAvatarError, match=r"the shards label frames \[.*\], which the bundle's emotion table \(\['calm', 'stormy'\]\) lacks"):
        render(shards, odd, out, RenderConfig(actors=["actor_000"]))

    teachers = tmp_path / "teachers"
    make_tiny_bundle(teachers, "actor_000", variants=("teacher",))
    with pytest.raises(ConsistentAvatarError, match=r"needs the LCM student weights of fcsd, tsdm.*--sampler ddim"):
        render(shards, teachers, out, RenderConfig(actors=["actor_000"], sampler="lcm"))

    with pytest.raises(ConsistentAvatarError, match=r"rows\.0: Input should be 'full'"):
        RenderConfig.build(rows=["fulll"])
    assert not out.exists()  # nothing was written anywhere


def test_shard_uris_that_cannot_be_read_and_a_uri_as_out_are_refused_before_any_ray_work(
    no_ray_work, shards: Path, bundles: Path, tmp_path: Path
) -> None:
    cfg = RenderConfig(actors=GOOD, progress=False)
    out = tmp_path / "OUT"
    with pytest.raises(ConsistentAvatarError, match=r"cannot open the shards URI 'nosuch://b/s'.*s3://bucket"):
        render("nosuch://b/s", bundles, out, cfg)
    gone = (tmp_path / "gone").as_uri()
    with pytest.raises(ConsistentAvatarError, match=rf"{re.escape(gone)} holds no manifest\.json.*cavatar prepare"):
        render(gone, bundles, out, cfg)
    with pytest.raises(ConsistentAvatarError, match=r"OUT 's3://b/out' is a URI, but it must be a local or shared"
                                                    r"-filesystem path: .*lock.*rename"):
        render(shards, bundles, "s3://b/out", cfg)
    assert not out.exists()


def test_many_problems_are_reported_together(no_ray_work, shards: Path, bundles: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConsistentAvatarError) as info:
        render(shards, empty, tmp_path / "OUT", RenderConfig())
    text = str(info.value)
    assert all(f"actor '{a}'" in text for a in ACTORS) and "nothing was rendered" in text


def test_the_train_split_renders_every_training_frame(shards: Path, bundles: Path, tmp_path: Path) -> None:
    """--split train renders the 20 frames before the test split (paper: the training frames, e.g.
    to look at what the model fits) and records that split; another split into the same OUT is refused."""
    out = tmp_path / "OUT"
    report = render(shards, bundles, out, RenderConfig(split="train", actors=["actor_000"], batch_size=10,
                                                       concurrency=1, video=False, progress=False))
    assert report.rendered["full"]["actor_000"] == 20
    t = read_outputs(out, "full", "actor_000")
    assert t["frame"].to_pylist() == list(range(20)) and set(t["split"].to_pylist()) == {"train"}
    with pytest.raises(ConsistentAvatarError, match="holds renders of the 'train' split"):
        render(shards, bundles, out, RenderConfig(split="all", actors=["actor_000"], progress=False))


def _settled(folder: Path, quiet: float = 2.0, limit: float = 30.0) -> None:
    """Wait until nothing under ``folder`` has changed for ``quiet`` seconds (at most ``limit``)."""
    import time

    def state() -> set[tuple[str, int]]:
        return {(str(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}

    last, since, start = state(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() - start < limit:
        time.sleep(0.25)
        now = state()
        if now != last:
            last, since = now, time.monotonic()


def _bar_that_stops(after: int, exc: BaseException):
    """A tqdm stand-in whose ``after``-th update raises ``exc`` — what Ctrl-C (or a dying Ray job) does
    to the driver while it reads the job's results."""
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        updates = 0

        def update(self, n=1):  # noqa: ANN001
            Bar.updates += 1
            if Bar.updates == after:
                raise exc
            return super().update(n)

    return Bar


@pytest.mark.parametrize("stop", ["interrupt", "job failure"])
def test_a_render_stopped_mid_job_keeps_what_it_wrote_and_resumes(
    stop: str, shards: Path, bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the job runs: a clear error saying how many frames are kept, the manifest written,
    no mp4 of a half video; a Ray Data job that fails as a whole: its error in the report. Either
    way the re-run renders only the rest."""
    import tqdm.auto

    out = tmp_path / "OUT"
    config = RenderConfig(actors=["actor_000"], batch_size=1, concurrency=1, progress=True)
    exc: BaseException = KeyboardInterrupt() if stop == "interrupt" else RuntimeError("the object store died")
    monkeypatch.setattr(tqdm.auto, "tqdm", _bar_that_stops(2, exc))
    if stop == "interrupt":
        with pytest.raises(ConsistentAvatarError, match=r"render interrupted: \d+ frames are complete .* kept; re-run"):
            render(shards, bundles, out, config)
    else:
        report = render(shards, bundles, out, config)
    manifest_count = read_render_manifest(out)["actors"]["actor_000"]["rendered"]["full"]
    # The driver stopped reading after one result; write tasks already running may still publish theirs
    # (Ray Data cancels them without waiting): nothing is lost either way. Wait until OUT is still.
    _settled(out / "full" / "actor_000")
    kept = set(read_outputs(out, "full", "actor_000")["frame"].to_pylist())
    assert kept and kept <= set(TEST_FRAMES) and 0 < manifest_count <= len(kept)
    if stop == "job failure" and kept != set(TEST_FRAMES):  # the missing frames are blamed on the job's error
        assert "the Ray Data job failed: RuntimeError: the object store died" in report.failed["actor_000"]
    if stop == "interrupt":  # no mp4 written after Ctrl-C (a failed job writes those of complete videos)
        assert not (out / "full" / "actor_000" / "actor_000.mp4").exists()
    # Only the kept frames' PNGs: a write task cancelled between a unit's PNGs and its parquet part leaves
    # PNGs of an incomplete unit, which the re-run renders again (overwriting them), as it should.
    pngs = [render_outputs.frame_png(out, "full", "actor_000", f) for f in sorted(kept)]
    before = {p: p.stat().st_mtime_ns for p in pngs}

    monkeypatch.undo()
    report = render(shards, bundles, out, RenderConfig(actors=["actor_000"], batch_size=1, concurrency=1, progress=False))
    # A write task held off the CPU past _settled may still publish its unit after ``kept`` was read:
    # the re-run keeps that too, so count against what it found, not against ``kept``.
    again = report.kept.get("full", {}).get("actor_000", 0)
    assert again >= len(kept) and again + report.rendered.get("full", {}).get("actor_000", 0) == len(TEST_FRAMES)
    assert read_outputs(out, "full", "actor_000")["frame"].to_pylist() == TEST_FRAMES
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing kept was rendered again
    assert (out / "full" / "actor_000" / "actor_000.mp4").is_file()


# ---------------------------------------------------------------------------------------------
# Atomicity of one batch (in-process: the three stages' code without Ray)
# ---------------------------------------------------------------------------------------------


def _cpu_job(
    out: Path, plans: dict, *, compile: bool, batch_size: int, compile_cache: str | None = None
) -> render_job.JobSpec:
    """The JobSpec of a one-thread float32 CPU render into ``out`` with an LRU of one pipeline."""
    return render_job.JobSpec(
        out=str(out), actors=plans, seed=0, use_gpu=False, dtype="float32", num_threads=1,
        compile=compile, compile_cache=compile_cache, batch_size=batch_size, refine=None, refiner=None,
        cache_size=1, verify=True,
    )


def test_a_killed_batch_leaves_nothing_half_written(shards: Path, bundles: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "OUT"
    config = RenderConfig(actors=["actor_000"], progress=False)
    _, plans = render_job._check_inputs(shards, str(bundles), config)
    spec = _cpu_job(out, plans, compile=False, batch_size=8)
    renderer = render_job.FrameRenderer(spec)
    unit = {"row": np.array(["full"]), "actor": np.array(["actor_000"]), "frames": np.array([json.dumps(TEST_FRAMES)])}
    settings = plans["actor_000"].rows["full"].settings
    d = out / "full" / "actor_000"

    def run(batch: dict) -> dict:  # load → render → write, as the job chains them
        return render_job.render_units_locally(spec, batch, renderer)

    def killed(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # stands in for SIGKILL between the PNGs and the parquet part

    with monkeypatch.context() as m:  # killed after the PNGs, before the parquet part
        m.setattr(render_outputs.pq, "write_table", killed)
        with pytest.raises(KeyboardInterrupt):
            run(unit)
    assert len(list((d / "frames").glob("*.png"))) == 4 and not list(d.glob("*.parquet"))
    assert render_outputs.scan_outputs(out, "full", "actor_000", settings).frames == set()  # PNGs alone do not count

    calls = []
    real_replace = render_outputs.os.replace

    def dies_on_second_png(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    shutil.rmtree(d)
    import consistent_avatar.io as cio

    with monkeypatch.context() as m:
        m.setattr(cio.os, "replace", dies_on_second_png)
        with pytest.raises(KeyboardInterrupt):
            run(unit)
    assert [p.name for p in (d / "frames").glob("*.png")] == ["000020.png"]  # the other one is hidden
    assert [p.name for p in (d / "frames").iterdir() if p.name.startswith(".")]

    result = run(unit)  # a fresh attempt completes the unit
    assert result["error"].tolist() == [""] and result["frames"].tolist() == [4]
    assert render_outputs.scan_outputs(out, "full", "actor_000", settings).frames == set(TEST_FRAMES)
    other = dict(settings, steps=2)
    scan = render_outputs.scan_outputs(out, "full", "actor_000", other)
    assert scan.frames == set() and "steps 4 → 2" in next(iter(scan.stale.values()))


# ---------------------------------------------------------------------------------------------
# CLI and config
# ---------------------------------------------------------------------------------------------


def test_cli_options_make_the_config_and_the_command_round_trips() -> None:
    from consistent_avatar.cli import build_parser

    parser = build_parser()
    argv = ["render", "--shards", "S", "--bundles", "s3://bucket/bundles", "--out", "O", "--split", "all",
            "--actors", "a,b", "--rows", "full,without_lcm", "--steps", "2", "--teacher-steps", "10",
            "--seed", "7", "--batch-size", "16", "--concurrency", "1:4", "--gpus-per-actor", "0.5",
            "--dtype", "bfloat16", "--io-cpus", "0.5", "--no-refiner", "--fps", "30", "--force",
            "--no-shard-latents"]
    config = config_from_args(parser.parse_args(argv))
    assert config.split == "all" and config.actors == ["a", "b"] and config.rows == ["full", "without_lcm"]
    assert (config.steps, config.teacher_steps, config.seed, config.batch_size) == (2, 10, 7, 16)
    assert config.concurrency == (1, 4) and config.num_gpus_per_actor == 0.5 and config.use_gpu
    assert config.refine is False and config.fps == 30 and config.force and config.torch_dtype_name == "bfloat16"
    assert config.io_cpus == 0.5 and not config.shard_latents
    line = command_line("S", "s3://bucket/bundles", "O", config)
    again = config_from_args(parser.parse_args(line.split()[1:]))
    assert again == config
    plain = config_from_args(parser.parse_args(["render", "--shards", "S", "--bundles", "B", "--out", "O", "--rows", "all"]))
    assert plain.rows == list(ROWS) and plain.shard_latents and "--no-shard-latents" not in command_line("S", "B", "O", plain)
    assert RenderConfig().torch_dtype_name == "float32"
    assert set(get_args(render_config.SchedulerKind)) == set(get_args(SchedulerKind))  # spelled out, kept in step


def test_cli_exit_code_is_1_when_an_actor_failed(monkeypatch, capsys, tmp_path: Path) -> None:
    import consistent_avatar.render.job as job_module

    def fake_render(shards, bundles, out, config, command=None):
        report = job_module.RenderReport(out=Path(out), split="test", rows=["full"], actors=["a", "b"])
        report.rendered = {"full": {"a": 4, "b": 0}}
        report.missing = {"full": {"a": 0, "b": 4}}
        report.failed = {"b": "row full: 4 of 4 frames missing: bundle is corrupt"}
        return report

    monkeypatch.setattr(job_module, "render", fake_render)
    code = main(["render", "--shards", "S", "--bundles", "B", "--out", str(tmp_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "b: row full: 4 of 4 frames missing: bundle is corrupt" in captured.err
    assert "FAILED" in captured.out
    assert main(["render", "--shards", "S", "--bundles", "B", "--out", "O", "--rows", "nope"]) == 1
    assert "invalid render settings: rows.0" in capsys.readouterr().err


def test_gpu_pool_on_a_cluster_without_gpus_now() -> None:
    """No GPUs in the cluster yet (a KubeRay GPU group scaling from zero): without a pool size the
    render cannot size its pool and says how to wait; with one, the pool is built and waits."""
    import ray.data

    with pytest.raises(ConsistentAvatarError, match="--concurrency"):
        render_job._pool(RenderConfig.build(num_gpus_per_actor=1), units=4)
    pool = render_job._pool(RenderConfig.build(num_gpus_per_actor=1, concurrency=(1, 2)), units=4)
    assert isinstance(pool, ray.data.ActorPoolStrategy)


def test_the_pool_leaves_cpus_for_the_load_and_write_tasks() -> None:
    """On the 2-CPU local Ray of the tests: the default pool (one actor per CPU) asks for less than a
    CPU per actor so that a load and a write task fit beside it; GPU pools keep their CPU request."""
    import ray

    assert ray.cluster_resources()["CPU"] == 2
    res = render_job._resources(RenderConfig(), units=10)
    assert (res.pool.max_size, res.actor_cpus, res.io_cpus, res.io_tasks) == (2, 0.9, 0.1, 2)
    res = render_job._resources(RenderConfig(io_cpus=0.25), units=10)
    assert res.actor_cpus == 0.75
    assert render_job._resources(RenderConfig(), units=1).actor_cpus == 1.0  # one actor leaves a CPU
    assert render_job._resources(RenderConfig(concurrency=1, num_cpus_per_actor=0.5), units=10).actor_cpus == 0.5
    assert render_job._resources(RenderConfig(concurrency=6), units=10).actor_cpus == 0.3
    with pytest.raises(ConsistentAvatarError, match=r"not enough for 2 pool actor\(s\) and the load and write tasks"):
        render_job._resources(RenderConfig(io_cpus=1), units=10)
    # the same CPUs for the actors and the I/O tasks: the task pool is sized apart from the actor pool,
    # else Ray Data would fuse the load stage into the pool actors
    res = render_job._resources(RenderConfig(concurrency=2, num_cpus_per_actor=0.1), units=10)
    assert (res.pool.max_size, res.actor_cpus, res.io_cpus, res.io_tasks) == (2, 0.1, 0.1, 3)
    # a GPU pool waiting for an autoscaler's GPU nodes asks for what it was told
    res = render_job._resources(RenderConfig(num_gpus_per_actor=1, concurrency=4), units=10)
    assert (res.actor_cpus, res.actor_gpus) == (1.0, 1)


def _fake_cluster(monkeypatch, *nodes: tuple[float, float], dead: tuple[float, float] | None = None) -> None:
    """Make ``ray.nodes`` / ``ray.cluster_resources`` describe alive nodes of (CPUs, GPUs)."""
    import ray

    listed = [{"Alive": True, "Resources": {"CPU": c, **({"GPU": g} if g else {})}} for c, g in nodes]
    if dead:
        listed.append({"Alive": False, "Resources": {"CPU": dead[0], "GPU": dead[1]}})
    total = {"CPU": float(sum(c for c, _ in nodes)), "GPU": float(sum(g for _, g in nodes))}
    monkeypatch.setattr(ray, "nodes", lambda: listed)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {k: v for k, v in total.items() if v})


def _left_per_node(res: render_job._Resources, nodes: list[tuple[float, float]]) -> list[float]:
    """CPUs each node keeps free when Ray packs onto it as many pool actors as fit there."""
    size = int(res.pool.max_size)
    left = []
    for cpus, gpus in nodes:
        fit = int(round(cpus * 1e4) // round(res.actor_cpus * 1e4))
        if res.actor_gpus:
            fit = min(fit, int(gpus // res.actor_gpus))
        left.append(cpus - min(fit, size) * res.actor_cpus)
    return left


def test_the_io_reserve_holds_on_every_node(monkeypatch) -> None:
    """Ray places pool actors node by node: on 3 nodes of 2 CPUs the default CPU pool (6 actors) must
    leave a load and a write task's CPUs on each node, not 0.2 CPU over the whole cluster."""
    nodes = [(2.0, 0.0)] * 3
    _fake_cluster(monkeypatch, *nodes, dead=(64.0, 8.0))
    res = render_job._resources(RenderConfig(), units=10)
    assert (res.pool.max_size, res.actor_cpus, res.io_tasks) == (6, 0.9, 6)
    assert all(left >= 2 * res.io_cpus - 1e-9 for left in _left_per_node(res, nodes))
    # a 0-CPU head node holds no actor and changes nothing
    _fake_cluster(monkeypatch, (0.0, 0.0), *nodes)
    assert render_job._resources(RenderConfig(), units=10).actor_cpus == 0.9
    # more actors than the nodes hold at 0.9: an equal share that fits them all, per node
    res = render_job._resources(RenderConfig(concurrency=9), units=10)
    assert res.actor_cpus == 0.6
    assert all(left >= 0.2 - 1e-9 for left in _left_per_node(res, nodes))
    # uneven nodes: the big node, packed at the small node's share, still keeps the reserve
    nodes = [(2.0, 0.0), (64.0, 0.0)]
    _fake_cluster(monkeypatch, *nodes)
    res = render_job._resources(RenderConfig(), units=100)
    assert res.pool.max_size == 66
    assert all(left >= 0.2 - 1e-9 for left in _left_per_node(res, nodes))
    # no node can hold an actor and the reserve: a fixed pool is refused, naming what to change
    _fake_cluster(monkeypatch, (0.2, 0.0), (0.2, 0.0))
    with pytest.raises(ConsistentAvatarError, match="--cpus-per-actor or --io-cpus"):
        render_job._resources(RenderConfig(concurrency=2), units=10)


def test_a_gpu_pool_leaves_each_gpu_node_cpus_for_the_io_tasks(monkeypatch) -> None:
    """4 nodes × 8 GPUs × 8 CPUs (and a CPU-only head): 32 actors of 1 GPU; 1 CPU each would take
    every CPU of a GPU node, so each asks for an equal share of the node's CPUs less the reserve."""
    nodes = [(8.0, 8.0)] * 4
    _fake_cluster(monkeypatch, (4.0, 0.0), *nodes)
    res = render_job._resources(RenderConfig.build(num_gpus_per_actor=1), units=100)
    assert (res.pool.max_size, res.actor_cpus, res.actor_gpus, res.io_tasks) == (32, 0.975, 1, 36)
    assert all(left >= 0.2 - 1e-9 for left in _left_per_node(res, nodes))
    # --cpus-per-actor 4 cannot give 8 actors per node 4 CPUs each: the same share
    res = render_job._resources(RenderConfig.build(num_gpus_per_actor=1, num_cpus_per_actor=4), units=100)
    assert res.actor_cpus == 0.975
    # 2 GPUs per actor: 4 actors per node, 1 CPU each leaves 4
    res = render_job._resources(RenderConfig.build(num_gpus_per_actor=2), units=100)
    assert (res.pool.max_size, res.actor_cpus) == (16, 1.0)


def test_a_pool_waiting_for_the_autoscaler_leaves_the_io_tasks_to_ray_data(monkeypatch) -> None:
    """A GPU pool waiting for GPU nodes, or a MIN:MAX pool: the I/O task count is not pinned to the
    CPUs present at submit time, and nothing is refused up front."""
    # a 0-CPU head, no GPU yet: the actors ask for what they were told, the I/O tasks are Ray Data's
    _fake_cluster(monkeypatch, (0.0, 0.0))
    res = render_job._resources(RenderConfig.build(num_gpus_per_actor=1, concurrency=4), units=10)
    assert (res.pool.max_size, res.actor_cpus, res.actor_gpus, res.io_tasks) == (4, 1.0, 1, None)
    res = render_job._resources(RenderConfig.build(num_gpus_per_actor=1, concurrency=(1, 4)), units=10)
    assert (res.pool.min_size, res.pool.max_size, res.io_tasks) == (1, 4, None)
    # a CPU pool MIN:MAX on a cluster that scales CPU nodes: it waits, it is not refused
    res = render_job._resources(RenderConfig(concurrency=(1, 4)), units=10)
    assert (res.pool.max_size, res.actor_cpus, res.io_tasks) == (4, 1.0, None)
    with pytest.raises(ConsistentAvatarError, match="not enough for 4 pool actor"):
        render_job._resources(RenderConfig(concurrency=4), units=10)
    # one small GPU node already there: its actor still leaves the reserve; the pool need not fit now
    nodes = [(1.0, 1.0)]
    _fake_cluster(monkeypatch, (2.0, 0.0), *nodes)
    res = render_job._resources(RenderConfig.build(num_gpus_per_actor=1, concurrency=4), units=10)
    assert (res.actor_cpus, res.io_tasks) == (0.8, None)
    assert all(left >= 0.2 - 1e-9 for left in _left_per_node(res, nodes))
    # a CPU MIN:MAX pool keeps the per-node reserve on the nodes it has, but is not shrunk to fit now
    _fake_cluster(monkeypatch, (2.0, 0.0))
    res = render_job._resources(RenderConfig(concurrency=(1, 8)), units=10)
    assert (res.pool.max_size, res.actor_cpus, res.io_tasks) == (8, 0.9, None)


def test_a_compiled_renderer_pads_short_units_to_its_batch_size(
    shards: Path, bundles: Path, tmp_path: Path, monkeypatch
) -> None:
    """Under --compile every call has the configured batch size (one compilation, one CUDA graph);
    the padding copies are dropped and the real frames come out as unpadded ones do."""
    from consistent_avatar.pipeline import ConsistentAvatarPipeline

    config = RenderConfig(actors=["actor_000"], progress=False)
    _, plans = render_job._check_inputs(shards, str(bundles), config)
    frames = TEST_FRAMES[:3]
    unit = {"row": np.array(["full"]), "actor": np.array(["actor_000"]), "frames": np.array([json.dumps(frames)])}
    batches: list[int] = []
    real_call = ConsistentAvatarPipeline.__call__

    def counting(self, coarse_rgb, *a, **k):  # records the batch each call really runs
        batches.append(int(coarse_rgb.shape[0]))
        return real_call(self, coarse_rgb, *a, **k)

    monkeypatch.setattr(ConsistentAvatarPipeline, "__call__", counting)
    # inductor needs a C++ toolchain and minutes on CPU: the padding is what this test is about
    monkeypatch.setattr(ConsistentAvatarPipeline, "compile", lambda self, *a, **k: self)
    images = {}
    for compiled in (False, True):
        out = tmp_path / f"OUT{int(compiled)}"
        spec = _cpu_job(out, plans, compile=compiled, batch_size=5)
        result = render_job.render_units_locally(spec, unit)
        assert result["error"].tolist() == [""] and result["frames"].tolist() == [3]
        settings = plans["actor_000"].rows["full"].settings
        assert render_outputs.scan_outputs(out, "full", "actor_000", settings).frames == set(frames)
        d = out / "full" / "actor_000" / "frames"
        assert sorted(p.name for p in d.glob("*.png")) == [f"{f:06d}.png" for f in frames]
        images[compiled] = [decode_png((d / f"{f:06d}.png").read_bytes()).astype(int) for f in frames]
        parts = pq.read_table(list((out / "full" / "actor_000").glob("outputs-*.parquet")))
        total = json.loads(parts["timings"][0].as_py())["total"]
        call = 5 if compiled else 3  # a padded call is booked per frame of the call, not per real frame
        assert parts["batch_size"].to_pylist() == [call] * 3
        assert parts["seconds"].to_pylist() == pytest.approx([total / call] * 3)
    assert batches == [3, 5]
    for plain, padded in zip(images[False], images[True]):
        assert np.abs(plain - padded).max() <= 1  # same noise per frame; only batch-size rounding differs


def test_the_previous_manifest_is_read_under_the_out_lock(
    no_ray_work, shards: Path, bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run merges its manifest over the one it read: reading it before taking the lock would lose
    the entries of a render that finished in between."""
    import fcntl

    seen: list[str] = []

    def probe(out: Path) -> None:
        with open(out / render_job.LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                seen.append("held")
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
                seen.append("free")
        raise ConsistentAvatarError("stop after the manifest read")

    monkeypatch.setattr(render_job, "read_render_manifest", probe)
    with pytest.raises(ConsistentAvatarError, match="stop after the manifest read"):
        render(shards, bundles, tmp_path / "OUT", RenderConfig(actors=GOOD, progress=False))
    assert seen == ["held"]


def test_gpu_and_cpu_renders_do_not_resume_each_other(shards: Path, bundles: Path) -> None:
    """A GPU draws the noise of a seed on the GPU, other values than a CPU: a GPU render's frame settings
    say so, and a CPU render's are unchanged (no key), so neither resumes the other's frames."""
    cpu = RenderConfig(actors=["actor_000"], dtype="float32", progress=False)
    gpu = RenderConfig(actors=["actor_000"], dtype="float32", num_gpus_per_actor=1, progress=False)
    (_, on_cpu), (_, on_gpu) = (render_job._check_inputs(shards, str(bundles), c) for c in (cpu, gpu))
    a, b = on_cpu["actor_000"].rows["full"].settings, on_gpu["actor_000"].rows["full"].settings
    assert "noise" not in a and b["noise"] == "cuda"
    assert {k: v for k, v in b.items() if k != "noise"} == a


def test_a_compiled_renderer_reuses_its_compiled_pipeline_for_the_next_actor(
    shards: Path, bundles: Path, tmp_path: Path, monkeypatch
) -> None:
    """Under --compile a pool actor compiles once: the pipeline evicted from its LRU adopts the next
    actor's weights in place, and that actor's frames are the ones a fresh pipeline renders."""
    from consistent_avatar.pipeline import ConsistentAvatarPipeline

    config = RenderConfig(actors=["actor_000", "actor_001"], progress=False)
    _, plans = render_job._check_inputs(shards, str(bundles), config)
    compiled: list[int] = []
    # dynamo tracing only (inductor needs minutes on CPU): what matters here is which object is reused
    real_compile = ConsistentAvatarPipeline.compile
    monkeypatch.setattr(
        ConsistentAvatarPipeline, "compile",
        lambda self, *a, **k: compiled.append(id(self)) or real_compile(self, backend="eager"),
    )
    images = {}
    for compile_ in (False, True):
        out = tmp_path / f"OUT{int(compile_)}"
        spec = _cpu_job(out, plans, compile=compile_, batch_size=3)
        renderer = render_job.FrameRenderer(spec)
        for actor in ("actor_000", "actor_001"):
            unit = {"row": np.array(["full"]), "actor": np.array([actor]), "frames": np.array([json.dumps(TEST_FRAMES[:3])])}
            result = render_job.render_units_locally(spec, unit, renderer)
            assert result["error"].tolist() == [""], result["error"]
            d = out / "full" / actor / "frames"
            images[compile_, actor] = [decode_png((d / f"{f:06d}.png").read_bytes()).astype(int) for f in TEST_FRAMES[:3]]
        if compile_:
            assert list(renderer.pipelines) == ["actor_001"] and renderer.pipelines["actor_001"].actor == "actor_001"
            assert compiled == [id(renderer.pipelines["actor_001"])]  # compiled once, for actor_000, then adopted
    for actor in ("actor_000", "actor_001"):
        for plain, reused in zip(images[False, actor], images[True, actor]):
            assert np.abs(plain - reused).max() <= 1
    assert any(np.abs(a - b).max() > 1 for a, b in zip(images[True, "actor_000"], images[True, "actor_001"]))
