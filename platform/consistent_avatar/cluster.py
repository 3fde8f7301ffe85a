"""Connecting to Ray: a cluster when ``RAY_ADDRESS`` (or ``--address``) names one, a local Ray otherwise.

A local Ray on a small machine needs one setting that Ray's defaults get wrong for our jobs:
Ray keeps at most ``num_workers_soft_limit`` idle worker processes (default: the CPU count) and
kills the rest. Our jobs run many fractional-CPU tasks beside long-lived actors (Ray Data read
tasks at 0.25 CPU next to training workers), so on 2 CPUs more workers are busy at once than the
soft limit allows; Ray then kills and restarts Python worker processes continuously (seconds of
CPU each), and training starves for data. A local Ray started here raises the limit.
"""

from __future__ import annotations

import os
from typing import Any

#: idle worker processes kept per CPU by a local Ray started with :func:`ensure_ray`
WORKERS_PER_CPU = 4


def ensure_ray(**init_kwargs: Any) -> None:
    """``ray.init`` unless Ray is already initialised: the cluster at ``RAY_ADDRESS`` if set, else
    a local Ray with the worker-pool limit above (``init_kwargs`` go to ``ray.init``)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"configure_logging": False, **init_kwargs}
    if not os.environ.get("RAY_ADDRESS") and "address" not in kwargs:
        cpus = kwargs.get("num_cpus") or os.cpu_count() or 1
        kwargs.setdefault("_system_config", {"num_workers_soft_limit": int(WORKERS_PER_CPU * cpus)})
    ray.init(**kwargs)
