"""Writing a benchmark's JSON record as it goes, without losing the last complete one.

A long GPU benchmark rewrites its record after every configuration or phase so that a run cut short
by a device call's time limit keeps what it measured. Until the run completes that record goes to
``<name>.partial.json`` beside the output: the complete record already at the output path (often a
committed result) is replaced only by another complete one, and the partial file is then removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def partial_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.partial{out.suffix or '.json'}")


def write_record(out: Path, record: dict[str, Any], complete: bool) -> Path:
    """Write ``record`` atomically to ``out`` when ``complete``, else to :func:`partial_path`; returns
    the path written."""
    target = out if complete else partial_path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, target)
    if complete:
        partial_path(out).unlink(missing_ok=True)
    return target
