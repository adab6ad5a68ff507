"""A real single-node SLURM cluster for the slurm tier.

The session fixture ``slurm_cluster`` runs ``scripts/slurm-cluster.sh start``, which
installs slurm-wlm and munge with apt-get when they are missing (as root) and starts
munged, slurmctld and slurmd on this machine. Tests that use it are skipped, with the
reason and the end of the daemons' logs, only when that cannot work: not root and no
cluster running, no apt-get, or the daemons failing to start. A cluster the fixture
started is stopped at the end of the session unless CONVEYOR_SLURM_KEEP=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm-cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    """What the tests need to know about the running cluster."""

    node: str
    cpus: int
    real_memory_mb: int
    partitions: tuple[str, ...]


def _run_script(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _node_info() -> SlurmCluster:
    out = subprocess.run(
        ["scontrol", "-o", "show", "node"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    partitions = subprocess.run(
        ["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True
    ).stdout.split()
    return SlurmCluster(
        node=fields["NodeName"],
        cpus=int(fields["CPUTot"]),
        real_memory_mb=int(fields["RealMemory"]),
        partitions=tuple(partitions),
    )


def _skip(reason: str) -> None:
    # printed as well, so it is visible with -s and in CI logs, not only in -ra
    sys.stderr.write(f"\n[slurm tier skipped] {reason}\n")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    if not CLUSTER_SCRIPT.exists():
        _skip(f"{CLUSTER_SCRIPT} is missing")
    if shutil.which("bash") is None:
        _skip("bash is not available")

    was_up = (
        shutil.which("sinfo") is not None
        and _run_script("status", timeout=60).returncode == 0
    )
    if not was_up:
        if os.geteuid() != 0:
            _skip(
                "no SLURM cluster is running and this is not root: "
                "cannot install or start one (run `sudo bash scripts/slurm-cluster.sh "
                "start` first, or run the tests as root)"
            )
        if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
            _skip("SLURM is not installed and there is no apt-get to install it")
        try:
            started = _run_script("start", timeout=900)
        except subprocess.TimeoutExpired as err:
            _skip(f"starting the SLURM cluster timed out: {_tail(str(err.stderr or ''))}")
        if started.returncode != 0:
            _skip(
                "the single-node SLURM cluster did not start "
                f"(scripts/slurm-cluster.sh start exited {started.returncode}):\n"
                + _tail(started.stdout + "\n" + started.stderr)
            )

    try:
        info = _node_info()
    except (subprocess.CalledProcessError, FileNotFoundError, IndexError, KeyError) as err:
        _skip(f"SLURM answers but its node cannot be read: {err}")

    yield info

    if not was_up and os.environ.get("CONVEYOR_SLURM_KEEP") != "1":
        _run_script("stop", timeout=120)
