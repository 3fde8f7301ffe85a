"""Job entrypoint for `cavatar train` (e.g. ``ray job submit --working-dir . -- python jobs/train.py
--shards S --preset sd15 --out RUNS --gpus-per-worker 1``).

Thin on purpose: the same arguments as ``cavatar train`` (see ``docs/training.md``). Submitted as a
Ray job, the driver runs on the head node and ``ray.init()`` joins the cluster, so each actor's
trainers are placed on its GPU nodes.
"""

from __future__ import annotations

import sys

from consistent_avatar.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
