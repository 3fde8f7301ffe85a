"""`cavatar evaluate` + report.html on a hand-built render run (the `cavatar render` output contract).

The run is written here, not rendered: 64² shards of two synthetic actors (one named with HTML
metacharacters), and rows whose frames are known functions of the real frames, so every value can be
checked by hand:

- ``full``: the real frames exactly → L2 0, PSNR ∞, SSIM 1, flicker 0, flow-curve difference 0;
- ``baseline``: every pixel moved by exactly 8 levels (up below 128, down above) → L2 = (8/255)²,
  PSNR = 20·log10(255/8) on every frame;
- ``without_normal``: frame f moved by d(f) = 1 + f mod 5 levels → per-frame PSNR 20·log10(255/d(f)),
  which catches frames matched to the wrong real frame.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from consistent_avatar.cli import main
from consistent_avatar.data.shards import decode_images, read_actor_table
from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.evaluation.job import EvaluateConfig, evaluate
from consistent_avatar.evaluation.report import write_report

ODD = 'a<b>&"c'  # an actor name that must be escaped in HTML
ACTORS = ("actor_000", ODD)
SECONDS = {"full": 0.25, "baseline": 0.5, "without_normal": 0.125}


def _shift(img: np.ndarray, d: int) -> np.ndarray:
    """Every channel value moved by exactly ``d`` levels: up below 128, down from 128."""
    x = img.astype(np.int16)
    return np.where(x < 128, x + d, x - d).astype(np.uint8)


def _row_images(row: str, frames: list[int], real: np.ndarray) -> np.ndarray:
    if row == "full":
        return real.copy()
    if row == "baseline":
        return _shift(real, 8)
    if row == "without_normal":
        return np.stack([_shift(r, 1 + f % 5) for f, r in zip(frames, real)])
    raise ValueError(row)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def make_run(shards: Path, run: Path, rows: tuple[str, ...] = ("full", "baseline", "without_normal"),
             actors: tuple[str, ...] = ACTORS) -> Path:
    """A render run in the contract layout, written by hand."""
    man_actors = {}
    for actor in actors:
        t = read_actor_table(shards, actor, split="test", columns=["frame", "split", "real_rgb"])
        frames = [int(f) for f in t["frame"].to_pylist()]
        real = decode_images(t["real_rgb"])
        man_actors[actor] = {"frames": len(frames), "resolution": int(real.shape[1]),
                             "rendered": {r: len(frames) for r in rows}, "failed": {}}
        for row in rows:
            imgs = _row_images(row, frames, real)
            pngs = []
            for f, img in zip(frames, imgs):
                rel = f"{row}/{actor}/frames/{f:06d}.png"
                _write_png(run / rel, img)
                pngs.append(rel)
            n = len(frames)
            pq.write_table(
                pa.table({
                    "actor": [actor] * n, "frame": pa.array(frames, pa.int32()), "row": [row] * n,
                    "split": ["test"] * n, "png": pngs, "seconds": pa.array([SECONDS[row]] * n, pa.float64()),
                    "batch_size": pa.array([4] * n, pa.int32()), "timings": ['{"total": 1.0}'] * n,
                    "sampler": ["lcm"] * n, "steps": pa.array([4] * n, pa.int32()),
                    "seed": pa.array(frames, pa.int64()),
                }),
                run / row / actor / "outputs.parquet",
            )
    manifest = {
        "schema_version": 1, "shards": str(shards), "bundles": str(run.parent / "bundles"), "split": "test",
        "rows": list(rows), "actors": man_actors,
        "settings": {r: {"sampler": "lcm", "steps": 4, "seed": 0} for r in rows},
        "command": "cavatar render --shards S --bundles B --out RUN", "machine": {"host": "test-host"},
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    (run / "render_manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """Two synthetic actors, 24 frames at 64² (12 test frames); the second renamed to ``ODD``."""
    from consistent_avatar.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("evaluate")
    src = root / "src"
    assert main(["synth", "--out", str(src), "--actors", "2", "--frames", "24", "--res", "64"]) == 0
    (src / "actor_001").rename(src / ODD)
    report = prepare([str(src)], root / "shards", PrepareConfig(test_frames=12, workers=1))
    assert report.ok, report.failed
    return root / "shards"


@pytest.fixture(scope="module")
def run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(shards, tmp_path_factory.mktemp("run") / "RUN")


@pytest.fixture(scope="module")
def no_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty TORCH_HOME: LPIPS must come out unavailable, whatever the machine caches."""
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture(scope="module")
def evaluated(run: Path, no_weights: Path) -> tuple[Path, dict]:
    result = evaluate(run, None, EvaluateConfig(torch_home=str(no_weights), progress=False))
    assert result.out == run / "eval"
    return result.out, json.loads((result.out / "metrics.json").read_text())


def _strict_json(path: Path) -> dict:
    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_metrics_json_values(evaluated: tuple[Path, dict], shards: Path) -> None:
    out, m = evaluated
    m = _strict_json(out / "metrics.json")
    assert m["schema_version"] == 1 and m["split"] == "test" and m["resolution"] == 64
    assert set(m["rows"]) == {"full", "baseline", "without_normal", "coarse"}
    assert m["command"] and m["machine"]["cpus"] and m["created_at"]
    assert m["render"]["command"].startswith("cavatar render")
    flow = m["components"]["flow"]  # the default --flow auto, without RAFT weights (empty TORCH_HOME)
    assert flow["estimator"] == "farneback" and flow["choice"].startswith("auto: Farneback")

    full = m["rows"]["full"]
    for actor in ACTORS:
        e = full["actors"][actor]
        assert e["frames"] == 12
        assert e["metrics"]["l2"] == 0.0 and e["metrics"]["psnr"] == "inf"
        assert e["metrics"]["ssim"] == pytest.approx(1.0)
        assert e["metrics"]["flicker"] == 0.0 and e["metrics"]["flow_mean_abs_diff"] == 0.0
        assert e["metrics"]["seconds_per_frame"] == pytest.approx(0.25)
        assert len(e["curves"]["flow_rendered"]) == 11 and e["curves"]["flow_rendered"] == e["curves"]["flow_real"]
        assert max(e["curves"]["flow_real"]) > 0  # the synthetic head moves
    assert full["mean"]["l2"] == 0.0 and full["mean"]["psnr"] == "inf" and full["mean"]["flicker"] == 0.0
    assert full["frame_mean"]["psnr"] == "inf" and full["actors"][ODD]["stats"]["psnr"]["n_inf"] == 12

    base = m["rows"]["baseline"]
    for entry in [base["mean"], *(base["actors"][a]["metrics"] for a in ACTORS)]:
        assert entry["l2"] == pytest.approx((8 / 255) ** 2, rel=1e-9)
        assert entry["psnr"] == pytest.approx(20 * math.log10(255 / 8), rel=1e-9)
        assert entry["seconds_per_frame"] == pytest.approx(0.5)
        assert entry["flicker"] >= 0.0

    # the coarse row is the shards' stage-1 render: L2 by hand, no render time
    coarse = m["rows"]["coarse"]
    for actor in ACTORS:
        t = read_actor_table(shards, actor, split="test", columns=["frame", "split", "real_rgb", "coarse_rgb"])
        real, crs = decode_images(t["real_rgb"]) / 255.0, decode_images(t["coarse_rgb"]) / 255.0
        assert coarse["actors"][actor]["metrics"]["l2"] == pytest.approx(((crs - real) ** 2).mean(), rel=1e-9)
        assert coarse["actors"][actor]["metrics"]["seconds_per_frame"] is None
        assert "stage 1" in coarse["actors"][actor]["unavailable"]["seconds_per_frame"]
    assert coarse["mean"]["seconds_per_frame"] is None and "seconds_per_frame" in coarse["unavailable"]
    assert coarse["mean"]["psnr"] < base["mean"]["psnr"]

    # unavailable, with reasons, never numbers
    for row in m["rows"].values():
        assert row["mean"]["lpips"] is None and str(m["config"]["torch_home"]) in row["unavailable"]["lpips"]
        assert row["mean"]["pose_error"] is None and "--face-estimator" in row["unavailable"]["pose_error"]
        assert row["mean"]["emotion_accuracy"] is None and row["unavailable"]["emotion_accuracy"]


def test_per_frame_parquet(evaluated: tuple[Path, dict]) -> None:
    out, _ = evaluated
    t = pq.read_table(out / "per_frame.parquet")
    assert t.num_rows == 4 * 2 * 12
    assert {"row", "actor", "frame", "split", "l2", "psnr", "ssim", "lpips", "seconds_per_frame", "flow_rendered",
            "flow_real", "flicker", "pose_error", "expression_error", "emotion_correct"} <= set(t.column_names)
    assert t.schema.field("frame").type == pa.int32()
    rows = t.to_pylist()
    wn = [r for r in rows if r["row"] == "without_normal" and r["actor"] == ODD]
    assert [r["frame"] for r in wn] == list(range(12, 24))
    for r in wn:  # frame-specific shift: a frame matched with the wrong real frame would not fit
        assert r["psnr"] == pytest.approx(20 * math.log10(255 / (1 + r["frame"] % 5)), rel=1e-9)
        assert r["seconds_per_frame"] == pytest.approx(0.125) and r["lpips"] is None and r["split"] == "test"
    full = [r for r in rows if r["row"] == "full"]
    assert all(r["psnr"] == math.inf and r["l2"] == 0.0 for r in full)
    firsts = [r for r in full if r["frame"] == 12]
    assert all(r["flow_rendered"] is None and r["flicker"] is None for r in firsts)  # pairs sit on their 2nd frame
    assert all(r["flicker"] == 0.0 for r in full if r["frame"] > 12)


def test_report_is_self_contained_and_escaped(evaluated: tuple[Path, dict]) -> None:
    out, m = evaluated
    page = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    for label in ("Coarse input", "w/o stage 2 (baseline)", "w/o normal", "Ours (full)", "Table 1", "Table 2"):
        assert label in page
    assert "w/o LCM" not in page  # only the rows that were rendered
    assert "a&lt;b&gt;&amp;&quot;c" in page and ODD not in page
    assert page.count("<svg") >= 4  # per-frame PSNR + flow curves per actor
    assert page.count("data:image/png;base64,") == 2 * 2 * 3  # worst + best frames of both actors
    assert "n/a" in page and "--face-estimator" in page  # unavailable metrics carry their reason
    assert "test-host" in page and html_escaped(m["command"]) in page
    assert m["strips_row"] == "full" and all((out / s["image"]).is_file() for s in m["strips"][ODD]["worst"])


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_report_from_dict_and_cli(evaluated: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, m = evaluated
    page = write_report(m, tmp_path / "r.html")  # strips found through the dict's eval_dir
    assert page.read_text().count("data:image/png;base64,") == 12
    assert main(["report", "--metrics", str(out / "metrics.json"), "--out", str(tmp_path / "cli.html")]) == 0
    assert "Ours (full)" in (tmp_path / "cli.html").read_text()
    assert main(["report", "--metrics", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "x.html")]) == 1
    assert "cavatar evaluate" in capsys.readouterr().err


def test_report_orders_all_six_rows_as_the_paper(evaluated: tuple[Path, dict], tmp_path: Path) -> None:
    """Every row the paper's tables have, given in a scrambled order, comes out in the paper's order
    (coarse input, w/o stage 2, w/o normal, w/o emotion, w/o LCM, full) in both tables."""
    import copy

    _, m = evaluated
    m = copy.deepcopy(m)
    rows = m["rows"]
    scrambled = {"full": rows["full"], "without_lcm": rows["baseline"], "coarse": rows["coarse"],
                 "without_emotion": rows["without_normal"], "baseline": rows["baseline"],
                 "without_normal": rows["without_normal"]}
    m["rows"] = scrambled
    page = write_report(m, tmp_path / "six.html").read_text(encoding="utf-8")
    labels = ["Coarse input (stage 1)", "w/o stage 2 (baseline)", "w/o normal", "w/o emotion", "w/o LCM", "Ours (full)"]
    for table in ("Table 1", "Table 2"):
        start = page.index(table)
        end = page.index("</table>", start)
        at = [page.index(f">{label}<", start, end) for label in labels]
        assert at == sorted(at), f"{table}: rows out of the paper's order"


def test_cli_subset_and_face_estimator(run: Path, shards: Path, tmp_path: Path) -> None:
    """`cavatar evaluate` with --rows/--actors and a (tiny, quickly fitted) face regressor: pose and
    expression errors, the estimator's floor on real frames, emotion accuracy vs synthetic truth."""
    from consistent_avatar.evaluation.face import FaceRegressorConfig, SyntheticFaceRegressor

    t = read_actor_table(shards, "actor_000", split="train", columns=["frame", "split", "real_rgb", "expression", "pose"])
    reg = SyntheticFaceRegressor(FaceRegressorConfig(res=32, width=4))
    reg.fit(decode_images(t["real_rgb"]), np.asarray(t["expression"].to_pylist()), np.asarray(t["pose"].to_pylist()),
            epochs=1, batch_size=12)
    reg.save(tmp_path / "face")
    out = tmp_path / "EVAL"
    code = main(["evaluate", "--run", str(run), "--out", str(out), "--rows", "full", "coarse", "--actors", "actor_000",
                 "--no-lpips", "--face-estimator", str(tmp_path / "face"), "--no-progress"])
    assert code == 0
    m = _strict_json(out / "metrics.json")
    assert set(m["rows"]) == {"full", "coarse"} and list(m["rows"]["full"]["actors"]) == ["actor_000"]
    assert "--no-lpips" in m["command"] and m["rows"]["full"]["unavailable"]["lpips"].startswith("LPIPS switched off")
    full = m["rows"]["full"]["actors"]["actor_000"]["metrics"]
    ref = m["reference"]["actors"]["actor_000"]
    assert math.isfinite(full["pose_error"]) and math.isfinite(full["expression_error"])
    assert full["pose_error"] == pytest.approx(ref["pose_error"])
    assert full["expression_error"] == pytest.approx(ref["expression_error"])
    assert 0.0 <= full["emotion_accuracy"] <= 1.0 and full["emotion_accuracy"] == pytest.approx(ref["emotion_accuracy"])
    assert 0.0 <= ref["tracked_emotion_accuracy"] <= 1.0
    assert m["components"]["face_estimator"]["reference"] == "tracked codes"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"{100 * m['reference']['mean']['tracked_emotion_accuracy']:.1f} %" in page
    assert "the shard&#x27;s tracked values" in page
    scores = m["rows"]["full"]["actors"]["actor_000"]["emotion"]
    assert scores["accuracy"] == pytest.approx(full["emotion_accuracy"]) and scores["n_frames"] == 12
    pf = pq.read_table(out / "per_frame.parquet").to_pylist()
    assert len(pf) == 2 * 12 and all(r["emotion_pred"] and r["emotion_true"] for r in pf)
    assert (out / "report.html").is_file()


class _OwnCodesEstimator:
    """Stands in for DECA/EMOCA (not installable here): an estimator whose codes are not the shards'
    (``shard_codes`` False). Its "expression" is each frame's mean colour, its "pose" the mean
    brightness of the top and bottom halves — deterministic functions of the pixels."""

    name = "own-codes"
    shard_codes = False
    expression_dims = (0, 1, 2)
    pose_dims = (0, 1)
    available = True
    reason = None

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(frames, np.float64) / 255.0
        expression = np.zeros((len(x), 100), np.float32)
        expression[:, :3] = x.mean(axis=(1, 2))
        pose = np.full((len(x), 6), np.nan, np.float32)
        h = x.shape[1] // 2
        pose[:, 0], pose[:, 1] = x[:, :h].mean(axis=(1, 2, 3)), x[:, h:].mean(axis=(1, 2, 3))
        return expression, pose


def test_an_estimator_with_codes_of_its_own_is_compared_with_its_reading_of_the_real_frames(
    run: Path, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DECA on synthetic actors (paper Table 2): PE/EE between the estimator's reading of the rendered
    frame and of the real frame — not against the shard's codes, which live in another space; no
    emotion accuracy (the database labels the shards' codes) and no real-frame floor, each with why."""
    from consistent_avatar.evaluation import job as eval_job

    est = _OwnCodesEstimator()
    monkeypatch.setattr(eval_job._Components, "_face", staticmethod(lambda config: (est, None)))
    result = evaluate(run, tmp_path / "EVAL", EvaluateConfig(lpips=False, progress=False, actors=["actor_000"]))
    m = _strict_json(result.out / "metrics.json")
    assert m["components"]["face_estimator"]["reference"] == "estimate on the real frames"

    t = read_actor_table(shards, "actor_000", split="test", columns=["frame", "split", "real_rgb"])
    real = decode_images(t["real_rgb"])
    frames = [int(f) for f in t["frame"].to_pylist()]
    e_real, p_real = est(real)
    for row in ("full", "baseline", "without_normal"):
        e_row, p_row = est(_row_images(row, frames, real))
        expected_ee = np.linalg.norm(e_row[:, :3] - e_real[:, :3], axis=1).mean()
        expected_pe = np.linalg.norm(p_row[:, :2] - p_real[:, :2], axis=1).mean()
        got = m["rows"][row]["actors"]["actor_000"]
        assert got["metrics"]["expression_error"] == pytest.approx(expected_ee, rel=1e-5, abs=1e-7)
        assert got["metrics"]["pose_error"] == pytest.approx(expected_pe, rel=1e-5, abs=1e-7)
        assert got["metrics"]["emotion_accuracy"] is None
        assert "codes of its own" in got["unavailable"]["emotion_accuracy"]
    assert m["rows"]["full"]["actors"]["actor_000"]["metrics"]["pose_error"] == 0.0
    assert m["rows"]["baseline"]["actors"]["actor_000"]["metrics"]["expression_error"] > 0.0
    ref = m["reference"]
    assert ref["actors"]["actor_000"]["pose_error"] is None and "codes of its own" in ref["unavailable"]["pose_error"]
    page = (result.out / "report.html").read_text(encoding="utf-8")
    assert "its reading of the real frame" in page


# ---------------------------------------------------------------------------------------------
# errors: clear ConsistentAvatarErrors, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def small_run(shards: Path, tmp_path: Path) -> Path:
    return make_run(shards, tmp_path / "RUN", rows=("full",), actors=("actor_000",))


def _fails(run: Path, match: str, **config: object) -> ConsistentAvatarError:
    with pytest.raises(ConsistentAvatarError, match=match) as info:
        evaluate(run, None, EvaluateConfig(lpips=False, progress=False, **config))
    assert not (run / "eval" / "metrics.json").exists()
    return info.value


def test_error_missing_manifest_and_shards(small_run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _fails(tmp_path / "empty", "render_manifest.json")
    _fails(tmp_path / "absent", "does not exist")
    man = json.loads((small_run / "render_manifest.json").read_text())
    man["shards"] = str(tmp_path / "gone")
    (small_run / "render_manifest.json").write_text(json.dumps(man))
    _fails(small_run, "not a shard directory")


def test_shards_given_as_a_uri_give_the_same_metrics(small_run: Path, shards: Path, tmp_path: Path) -> None:
    """A render manifest naming its shards by a file:// URI (as a render from s3://… would) evaluates
    to the same numbers as the plain path; bad or missing shard URIs and a URI as RUN are refused."""
    config = EvaluateConfig(lpips=False, progress=False)
    plain = evaluate(small_run, tmp_path / "plain", config)
    uri = shards.as_uri()
    man = json.loads((small_run / "render_manifest.json").read_text())
    man["shards"] = uri
    (small_run / "render_manifest.json").write_text(json.dumps(man))
    by_uri = evaluate(small_run, tmp_path / "uri", config)
    assert by_uri.metrics["shards"] == uri and plain.metrics["shards"] == str(shards)
    assert by_uri.metrics["rows"] == plain.metrics["rows"]
    assert pq.read_table(by_uri.per_frame_path).equals(pq.read_table(plain.per_frame_path))

    _fails(small_run, r"cannot open the shards URI 'nosuch://b/shards'.*file:///.*s3://", shards="nosuch://b/shards")
    gone = (tmp_path / "gone").as_uri()
    _fails(small_run, rf"{re.escape(gone)} holds no manifest\.json: it is not a shard directory", shards=gone)
    with pytest.raises(ConsistentAvatarError, match=r"RUN 's3://b/run' is a URI, but it must be a local or shared"):
        evaluate("s3://b/run", None, config)


def test_error_frames_of_two_render_settings(small_run: Path) -> None:
    """A forced re-render killed half-way leaves parts of new settings beside the old outputs: refused,
    naming the difference, instead of measuring old and new frames as one video."""
    import json as _json

    from consistent_avatar.render.outputs import SETTINGS_KEY

    d = small_run / "full" / "actor_000"
    t = pq.read_table(d / "outputs.parquet")
    old = {"sampler": "lcm", "steps": 4, "seed": 0}
    pq.write_table(t.replace_schema_metadata({SETTINGS_KEY: _json.dumps(old)}), d / "outputs.parquet")
    evaluate(small_run, small_run / "ok", EvaluateConfig(lpips=False, progress=False))  # one settings record: fine
    new = t.slice(0, 2).replace_schema_metadata({SETTINGS_KEY: _json.dumps({**old, "steps": 2})})
    pq.write_table(new, d / "outputs-0001-deadbeef.parquet")
    _fails(small_run, r"mixes frames rendered with different settings \(outputs.parquet → outputs-0001-deadbeef.parquet: "
           r"steps 4 → 2\).*--force")
    pq.write_table(t.slice(0, 2), d / "outputs-0001-deadbeef.parquet")  # a part recording nothing
    _fails(small_run, r"outputs-0001-deadbeef.parquet records no settings")


def test_error_rows_and_actors_absent(small_run: Path) -> None:
    err = _fails(small_run, "without_lcm", rows=["full", "without_lcm"])
    assert "cavatar render --rows without_lcm --out" in str(err)
    _fails(small_run, "'nobody'", actors=["nobody"])


def test_error_resolution_mismatch(small_run: Path) -> None:
    png = small_run / "full" / "actor_000" / "frames" / "000015.png"
    _write_png(png, np.zeros((32, 32, 3), np.uint8))
    err = _fails(small_run, "resolution mismatch")
    assert "frame 15" in str(err) and "actor_000" in str(err)
    man = json.loads((small_run / "render_manifest.json").read_text())
    man["actors"]["actor_000"]["resolution"] = 128
    (small_run / "render_manifest.json").write_text(json.dumps(man))
    _fails(small_run, "rendered at 128² but the shards .* are 64²")


def test_error_corrupt_and_missing_png(small_run: Path) -> None:
    frames = small_run / "full" / "actor_000" / "frames"
    (frames / "000017.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # caught before any metric runs
    err = _fails(small_run, "corrupt PNG")
    assert "actor 'actor_000', frame 17" in str(err)
    (frames / "000017.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40 + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    err = _fails(small_run, "corrupt PNG")  # complete-looking but undecodable: caught while loading
    assert "actor 'actor_000', frame 17" in str(err)
    (frames / "000017.png").unlink()
    err = _fails(small_run, "missing PNG")
    assert "frame 17" in str(err) and "cavatar render" in str(err)


def test_error_partially_rendered(small_run: Path) -> None:
    d = small_run / "full" / "actor_000"
    t = pq.read_table(d / "outputs.parquet")
    pq.write_table(t.slice(0, 8), d / "outputs.parquet")  # frames 20..23 never finished
    for f in range(20, 24):
        (d / "frames" / f"{f:06d}.png").unlink()
    err = _fails(small_run, "partially rendered")
    assert "4 of 12 frames are missing" in str(err) and "20, 21, 22, 23" in str(err)
    assert "re-run `cavatar render`" in str(err)
    # a killed run's parquet part completes it (newest row per frame)
    part = t.slice(8, 4)
    for f in range(20, 24):
        shutil.copy(d / "frames" / "000012.png", d / "frames" / f"{f:06d}.png")
    pq.write_table(part, d / "outputs-000020-abcd1234.parquet")
    result = evaluate(small_run, None, EvaluateConfig(lpips=False, progress=False, report=False))
    assert result.report_path is None and result.metrics["rows"]["full"]["actors"]["actor_000"]["frames"] == 12


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--run", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cavatar evaluate: error:") and "render_manifest.json" in err and "Traceback" not in err


def test_process_pool_gives_the_same_numbers(
    run: Path, evaluated: tuple[Path, dict], no_weights: Path, tmp_path: Path
) -> None:
    out, m = evaluated
    result = evaluate(run, tmp_path / "EVAL", EvaluateConfig(torch_home=str(no_weights), workers=2, progress=False))
    serial = pq.read_table(out / "per_frame.parquet")
    pooled = pq.read_table(result.per_frame_path)
    assert pooled.equals(serial)
    assert result.metrics["rows"] == m["rows"] and result.metrics["strips"] == m["strips"]
    assert result.metrics["config"]["workers"] == 2


def test_error_row_never_rendered_for_an_actor(small_run: Path) -> None:
    shutil.rmtree(small_run / "full" / "actor_000")
    err = _fails(small_run, "was not rendered for actor 'actor_000'")
    assert "--rows/--actors" in str(err)
    assert evaluate(small_run, None, EvaluateConfig(rows=["coarse"], lpips=False, progress=False)).metrics["strips"] == {}


def test_image_metrics_in_chunks_give_the_whole_video_s_numbers(
    run: Path, evaluated: tuple[Path, dict], no_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-frame image metrics run a few frames at a time (bounded memory on long 512² videos);
    chunk boundaries inside a video change nothing."""
    from consistent_avatar.evaluation import job

    out, m = evaluated
    monkeypatch.setattr(job, "IMAGE_METRIC_CHUNK", 5)  # 12 test frames: chunks of 5, 5, 2
    result = evaluate(run, tmp_path / "EVAL", EvaluateConfig(torch_home=str(no_weights), progress=False))
    assert pq.read_table(result.per_frame_path).equals(pq.read_table(out / "per_frame.parquet"))
    assert result.metrics["rows"] == m["rows"]


def test_strips_never_show_frames_without_a_psnr(tmp_path: Path) -> None:
    """A frame whose PSNR is NaN (empty foreground mask) is neither a worst nor a best frame."""
    from consistent_avatar.evaluation.job import _ActorData, _Unit, _write_strips

    n = 6
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    data = _ActorData(frames=list(range(n)), split=["test"] * n, real=real, coarse=real, mask=np.zeros((n, 16, 16), np.uint8),
                      expression=np.zeros((n, 100), np.float32), pose=np.zeros((n, 6), np.float32), emotion=["neutral"] * n)
    psnr = np.array([30.0, np.nan, 20.0, math.inf, np.nan, 25.0])
    info = _write_strips(tmp_path, 0, "a", "full", _Unit("full", "a", list(range(n))), real, data, psnr,
                         EvaluateConfig(strip_frames=2))
    assert [s["frame"] for s in info["worst"]] == [2, 5]
    assert [s["frame"] for s in info["best"]] == [3, 0]


def test_failed_re_evaluation_leaves_no_stale_metrics(small_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.json marks a complete evaluation: a re-run that fails after replacing other files
    must not leave the earlier metrics.json beside them."""
    from consistent_avatar.evaluation import report as report_module

    first = evaluate(small_run, None, EvaluateConfig(lpips=False, progress=False))
    assert first.metrics_path.is_file()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("report writer crashed")

    monkeypatch.setattr(report_module, "write_report", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        evaluate(small_run, None, EvaluateConfig(lpips=False, progress=False))
    assert not first.metrics_path.exists()
