"""Job entrypoint for `cavatar evaluate` (e.g. ``ray job submit --working-dir . -- python jobs/evaluate.py --run RUN``).

Thin on purpose: the same arguments as ``cavatar evaluate`` (see ``docs/evaluation.md``); the work is
:func:`consistent_avatar.evaluation.job.evaluate`. Evaluation runs in the driver process (one actor at
a time; it needs no cluster), so submitting it as a Ray job only places it next to the data.
"""

from __future__ import annotations

import sys

from consistent_avatar.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
