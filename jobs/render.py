"""Job entrypoint for `cavatar render` (e.g. ``ray job submit --working-dir . -- python jobs/render.py
--shards S --bundles B --out OUT --gpus-per-actor 1``).

Thin on purpose: the same arguments as ``cavatar render`` (see ``docs/render.md``); the work is
:func:`consistent_avatar.render.render`. Submitted as a Ray job, the driver runs on the head node and
``ray.init()`` joins the cluster, so the pool actors spread over its GPU nodes.
"""

from __future__ import annotations

import sys

from consistent_avatar.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["render", *sys.argv[1:]]))
