"""Job entrypoint for `cavatar prepare` (e.g. ``ray job submit --working-dir . -- python jobs/prepare.py
--sources /data/actors --out /data/shards``).

Thin on purpose: the same arguments as ``cavatar prepare`` (see the README's "Shards"). Submitted as
a Ray job, the Ray Data pipeline runs on the cluster's CPU workers.
"""

from __future__ import annotations

import sys

from consistent_avatar.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
