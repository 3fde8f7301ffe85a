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


#: the marker file :func:`check_shared_folder` writes (and removes) in the folder it checks
SHARED_MARKER = ".cavatar-shared-check"


def check_shared_folder(folder: str | os.PathLike[str], what: str) -> None:
    """Refuse a local ``folder`` that some alive Ray node cannot see, before any work is scheduled.

    Render write tasks, training workers and the per-actor training drivers run on any node and
    write into OUT / RUNS by path, so on a multi-node cluster (KubeRay pods) that path must be the
    same shared volume everywhere (e.g. a ReadWriteMany PVC mounted at the same path); otherwise
    outputs would scatter over the nodes' own disks and a resume would not find them. The driver
    writes a marker file with a random token; one zero-CPU task pinned to each other alive node
    reads it. A one-node cluster (a local Ray) needs no task.
    """
    import secrets
    from pathlib import Path

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .errors import ConsistentAvatarError

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    root = Path(folder).absolute()
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    marker = root / SHARED_MARKER
    marker.write_text(token)

    @ray.remote(num_cpus=0)
    def sees(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    try:
        refs = {
            f"{n.get('NodeManagerAddress', '?')} (node {n['NodeID'][:8]})": sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in others
        }
        try:
            answers = ray.get(list(refs.values()), timeout=120)
        except ray.exceptions.GetTimeoutError:
            raise ConsistentAvatarError(
                f"could not check within 120 s that {what} {root} is shared with every Ray node (a node is "
                "unresponsive): check `ray status`"
            ) from None
    finally:
        marker.unlink(missing_ok=True)
    problem = unshared_nodes(what, root, token, dict(zip(refs, answers)))
    if problem:
        raise ConsistentAvatarError(problem)


def unshared_nodes(what: str, root: object, token: str, answers: dict[str, str]) -> str | None:
    """The error for the nodes whose answer (what they read at the marker's path) is not ``token``,
    or None when every node saw the driver's marker."""
    blind = {node: seen for node, seen in answers.items() if seen != token}
    if not blind:
        return None
    listed = ", ".join(
        f"{node} ({seen if ':' in seen else 'another file at that path'})" for node, seen in sorted(blind.items())
    )
    return (
        f"{what} {root} is not shared with every node of the Ray cluster: {len(blind)} of {len(answers) + 1} "
        f"nodes do not see it — {listed}. Mount one shared volume (e.g. a ReadWriteMany PVC) at this path on "
        "every node, or run on a single node"
    )
