"""The `cavatar` command line: sub-commands, exit codes, one-line errors, and the package layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from consistent_avatar.cli import build_parser, main
from consistent_avatar.emotion import EmotionDatabase

REPO = Path(__file__).resolve().parents[1]


def test_import_platform_still_reaches_the_standard_library() -> None:
    """platform/ holds the library but must never shadow the stdlib module of the same name."""
    code = "import platform, consistent_avatar; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "site-packages" not in out.splitlines()[0] or "platform.py" in out.splitlines()[0]
    assert out.splitlines()[0].endswith("platform.py")
    assert not (REPO / "platform" / "__init__.py").exists()


def test_every_job_has_a_sub_command() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"synth", "emotion-db", "prepare", "train", "render", "evaluate", "report", "face-regressor", "demo"} <= commands


@pytest.mark.parametrize("job", sorted(p.stem for p in (REPO / "jobs").glob("*.py")))
def test_ray_job_entrypoints_front_their_sub_command(job: str) -> None:
    out = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: cavatar {job} ")


def test_emotion_db_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "db.parquet"
    assert main(["emotion-db", "--out", str(out), "--speakers", "2", "--seed", "3"]) == 0
    db = EmotionDatabase.read(out)
    assert len(db) > 0 and set(db.label_names) == {
        "angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised"
    }


def test_user_errors_are_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--sources", str(tmp_path / "nowhere"), "--out", str(tmp_path / "S")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cavatar prepare: error:") and "nowhere" in err[0]
    assert main(["synth", "--out", str(tmp_path / "x"), "--res", "4096"]) == 1
    assert "res" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prepare"])
    assert exc.value.code == 2
