"""Emotion labelling (eq. 7) at paper scale: 1.5 M labelled database vectors × 10 k frames.

The database is the synthetic MEAD (``consistent_avatar.synthetic.emotions``) grown to ~1.5 M rows
(MEAD has ~1.5-2 M frontal frames); the queries are synthetic actors' true expression codes, whose
per-frame emotion is known, so the same run reports labelling accuracy. Timed: building the
labeller (normalise + sort the database, once) and ``EmotionLabeller.label`` on all queries
(float32, exact, torch). Also reports accuracy with the default-size database that ``cavatar synth``
writes, for both metrics and with/without temporal smoothing.

    PYTHONPATH=platform python benchmarks/bench_emotion_label.py [--db-size 1500000] [--queries 10000]
        [--device cpu [cuda]] [--euclidean-large] [--out benchmarks/results/emotion_label.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_avatar.data.layout import EMOTIONS
from consistent_avatar.emotion import (
    EmotionDatabase,
    EmotionLabeller,
    build_synthetic_database,
    confusion_matrix,
    labelling_accuracy,
    smooth_labels,
)
from consistent_avatar.synthetic.emotions import sample_mead_expressions
from consistent_avatar.synthetic.head import Stage1Degradation
from consistent_avatar.synthetic.motion import actor_motion

SMOOTHING = 9


def machine_info(devices: list[str]) -> dict[str, Any]:
    from machine import machine_info as base

    return base(gpu="cuda" in devices) | {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}

def queries(n: int, frames_per_actor: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    actors = math.ceil(n / frames_per_actor)
    codes, truth = [], []
    for index in range(actors):
        m = actor_motion(seed, index, frames_per_actor, 25.0, Stage1Degradation.from_strength(1.0))
        codes.append(m.expression)
        truth += m.labels
    return np.concatenate(codes)[:n], np.asarray([EMOTIONS.index(x) for x in truth[:n]])


def accuracy_row(
    db_name: str, db: EmotionDatabase, metric: str, ids: np.ndarray, truth: np.ndarray
) -> dict[str, Any]:
    smoothed = smooth_labels(ids, SMOOTHING)
    cm = confusion_matrix(ids, truth)
    recall = np.diag(cm) / np.maximum(cm.sum(1), 1)
    return {
        "database": db_name,
        "database_vectors": len(db),
        "metric": metric,
        "accuracy": labelling_accuracy(ids, truth),
        f"accuracy_smoothed_{SMOOTHING}": labelling_accuracy(smoothed, truth),
        "recall_per_emotion": {e: round(float(r), 4) for e, r in zip(EMOTIONS, recall)},
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-size", type=int, default=1_500_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--frames-per-actor", type=int, default=2000)
    ap.add_argument("--device", nargs="+", default=["cpu"])
    ap.add_argument(
        "--chunk-size", type=int, default=None, help="database rows per block (default: per device)"
    )
    ap.add_argument("--query-chunk-size", type=int, default=None)
    ap.add_argument(
        "--euclidean-large", action="store_true", help="also label with metric=euclidean on the large db"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "emotion_label.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    q, truth = queries(args.queries, args.frames_per_actor, args.seed)
    frames_per_clip, clips = 100, 40
    speakers = math.ceil(args.db_size / (len(EMOTIONS) * clips * frames_per_clip))
    expr, labels, sources = sample_mead_expressions(
        speakers, clips, frames_per_clip, seed=args.seed + 1_000_003
    )
    big = EmotionDatabase.from_names(expr[: args.db_size], labels[: args.db_size], sources[: args.db_size])
    del expr, labels, sources
    gen_s = time.perf_counter() - t0
    print(
        f"generated {len(big):,} database vectors ({speakers} synthetic speakers) and {len(q):,} queries in {gen_s:.1f} s"
    )

    timing = []
    accuracy = []
    for device in args.device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch sees no CUDA device")
        t = time.perf_counter()
        lab = EmotionLabeller(
            big, chunk_size=args.chunk_size, device=device, query_chunk_size=args.query_chunk_size
        )
        sync(device)
        build_s = time.perf_counter() - t
        lab.label(q[:256])  # warm-up: kernels, allocator
        sync(device)
        t = time.perf_counter()
        ids, _ = lab.label(q)
        sync(device)
        label_s = time.perf_counter() - t
        timing.append(
            {
                "device": device,
                "metric": "cosine",
                "database_vectors": len(big),
                "queries": len(q),
                "chunk_size": lab.chunk_size,
                "query_chunk_size": lab.query_chunk_size,
                "build_s": build_s,
                "label_s": label_s,
                "queries_per_s": len(q) / label_s,
                "gflops": 2 * len(big) * len(q) * q.shape[1] / label_s / 1e9,
            }
        )
        print(f"{device}: build {build_s:.2f} s, label {len(q):,} × {len(big):,}: {label_s:.2f} s")
        if device == args.device[0]:
            accuracy.append(accuracy_row("synthetic MEAD, large", big, "cosine", ids, truth))
        if args.euclidean_large:
            lab = EmotionLabeller(
                big,
                chunk_size=args.chunk_size,
                device=device,
                query_chunk_size=args.query_chunk_size,
                metric="euclidean",
            )
            t = time.perf_counter()
            ids, _ = lab.label(q)
            sync(device)
            label_s = time.perf_counter() - t
            timing.append(
                {
                    **timing[-1],
                    "metric": "euclidean",
                    "label_s": label_s,
                    "queries_per_s": len(q) / label_s,
                    "gflops": 2 * len(big) * len(q) * q.shape[1] / label_s / 1e9,
                }
            )
            print(f"{device}: euclidean label {label_s:.2f} s")
            if device == args.device[0]:
                accuracy.append(accuracy_row("synthetic MEAD, large", big, "euclidean", ids, truth))
        del lab

    small = build_synthetic_database()  # what `cavatar synth` writes next to the actors (its default size)
    for metric in ("cosine", "euclidean"):
        ids, _ = EmotionLabeller(small, metric=metric).label(q)
        accuracy.append(accuracy_row("synthetic MEAD, default size", small, metric, ids, truth))

    print()
    print(
        f"{'device':8s} {'metric':10s} {'db vectors':>12s} {'queries':>8s} {'build s':>8s} {'label s':>8s} {'GFLOP/s':>8s}"
    )
    for r in timing:
        print(
            f"{r['device']:8s} {r['metric']:10s} {r['database_vectors']:>12,} {r['queries']:>8,} "
            f"{r['build_s']:>8.2f} {r['label_s']:>8.2f} {r['gflops']:>8.0f}"
        )
    print()
    print(
        f"{'database':30s} {'vectors':>10s} {'metric':10s} {'accuracy':>9s} {'smoothed ' + str(SMOOTHING):>11s} {'neutral recall':>15s}"
    )
    for r in accuracy:
        print(
            f"{r['database']:30s} {r['database_vectors']:>10,} {r['metric']:10s} {r['accuracy']:>9.3f} "
            f"{r[f'accuracy_smoothed_{SMOOTHING}']:>11.3f} {r['recall_per_emotion']['neutral']:>15.3f}"
        )

    result = {
        "benchmark": "emotion labelling (eq. 7): exact blockwise nearest neighbour, float32, torch",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "data": {
            "database": f"synthetic MEAD, {speakers} speakers × 8 emotions × {clips} clips × {frames_per_clip} frames, "
            f"first {len(big)} rows",
            "queries": f"true expression codes of {math.ceil(args.queries / args.frames_per_actor)} synthetic actors "
            f"(seed {args.seed}, {args.frames_per_actor} frames each), first {len(q)} frames",
            "generation_s": gen_s,
        },
        "timing": timing,
        "accuracy": accuracy,
        "smoothing_window": SMOOTHING,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
