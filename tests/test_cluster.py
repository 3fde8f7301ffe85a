"""Cluster checks: an output folder must be one shared volume on every Ray node."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from consistent_avatar.cluster import unshared_nodes

ROOT = Path(__file__).resolve().parents[1]


def test_a_folder_seen_by_every_node_of_a_two_node_cluster_passes(tmp_path: Path) -> None:
    """Two Ray nodes on this machine (``ray.cluster_utils.Cluster``; one disk, so the folder is shared):
    the check pins a task to the other node, which reads the driver's marker; the marker is removed.
    In a fresh process: the other tests' local Ray is already initialised in this one."""
    script = textwrap.dedent(
        f"""
        import ray
        from pathlib import Path
        from ray.cluster_utils import Cluster
        from consistent_avatar.cluster import SHARED_MARKER, check_shared_folder

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, configure_logging=False)
        cluster.wait_for_nodes()
        try:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            folder = Path({str(tmp_path / "OUT")!r})
            check_shared_folder(folder, "OUT")
            assert folder.is_dir() and not (folder / SHARED_MARKER).exists()
        finally:
            ray.shutdown()
            cluster.shutdown()
        print("shared-check-ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "shared-check-ok" in done.stdout, done.stderr[-3000:]


def test_nodes_that_do_not_see_the_marker_are_named_with_the_fix() -> None:
    token = "ab12"
    answers = {"10.0.0.2 (node 1111)": token, "10.0.0.3 (node 2222)": "FileNotFoundError: [Errno 2] No such file",
               "10.0.0.4 (node 3333)": "old5"}
    message = unshared_nodes("OUT", "/data/renders", token, answers)
    assert message is not None
    assert "OUT /data/renders is not shared with every node of the Ray cluster: 2 of 4 nodes" in message
    assert "10.0.0.3 (node 2222) (FileNotFoundError" in message and "10.0.0.4 (node 3333) (another file at that path)" in message
    assert "10.0.0.2" not in message and "ReadWriteMany PVC" in message
    assert unshared_nodes("OUT", "/data/renders", token, {"10.0.0.2 (node 1111)": token}) is None
