"""A multi-node Ray cluster on one machine, with token auth and S3 as the only shared disk.

A head (no CPUs for work) and worker nodes started with ``ray start`` on loopback, each
node in its own mount namespace (``unshare --mount``) with private folders, so a file one
node writes is not visible on another, as on separate machines:

- worker nodes: a private tmpfs over ``/tmp`` (Ray's session folder, temp files, anything
  raybm writes locally on a node);
- the head: a private tmpfs over ``/tmp/ray`` only (its Ray session), so the job driver,
  which runs on the head, still reads the config files a test writes under ``/tmp``.

What every node must run from (the checkout and its virtual environment) stays visible
under a private folder: a checkout under ``/tmp`` is bound back into the node's own
``/tmp`` after the tmpfs covers it, so the cluster works from a clone anywhere.

The only storage every node shares is moto's S3 server on loopback. Every node starts with
``RAY_AUTH_MODE=token`` and the token in ``~/.ray/auth_token``; the nodes get AWS
credentials from their own environment (as a cloud node gets them from its instance
profile), never from a job's runtime env.

Run it by hand::

    .venv/bin/python -m tests.cluster.local_cluster      # prints the address, Ctrl-C stops it

Tests use ``LocalCluster`` through the fixtures in ``tests/cluster/conftest.py``. Every
process is started by this module and stopped by process id: nothing is left running.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# What the nodes run from: the checkout (raybm, its tests, .venv) and the Python prefix.
KEPT = sorted({str(Path(__file__).resolve().parents[2]), os.path.realpath(sys.prefix)})
# Node-local object stores stay small: three nodes share the machine's /dev/shm.
OBJECT_STORE_BYTES = 200 * 1024 * 1024


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it."""
    pids, frontier = {root}, [root]
    while frontier:
        kids = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout.split()
        for kid in map(int, kids):
            if kid not in pids:
                pids.add(kid)
                frontier.append(kid)
    return pids


def kill_tree(root: int, *, graceful: bool = True) -> None:
    """Stop ``root`` and its descendants: SIGTERM, then SIGKILL what is left (only SIGKILL
    when ``graceful`` is false: a node that disappears)."""
    pids = process_tree(root)
    for sig in (signal.SIGTERM, signal.SIGKILL) if graceful else (signal.SIGKILL,):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM:
            deadline = time.time() + 10
            while time.time() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
    for pid in pids:  # reap our own children
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (a killed
    test run), so `ray start --block` stops its node instead of leaving it running."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Node:
    """One `ray start --block` process (the root of the node's process tree)."""

    name: str
    process: subprocess.Popen
    resources: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid


class LocalCluster:
    """A Ray head plus worker nodes, each in its own mount namespace, on loopback."""

    def __init__(self, workdir: Path, *, worker_cpus: tuple[float, ...] = (1, 1), env: dict | None = None):
        self.workdir = Path(workdir)
        self.worker_cpus = worker_cpus
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        # The cluster's own token (as `ray get-auth-token --generate` makes one), given to
        # every node in its environment; clients send it as a bearer token.
        self.token = secrets.token_hex(32)
        self.env = dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_DEDUP_LOGS="1",
            RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            **(env or {}),
        )
        self.env.pop("RAY_ADDRESS", None)
        # A mount point outside every private folder, for a node's view of what it keeps.
        self.holding = tempfile.mkdtemp(prefix="raybm-node-keep-", dir="/var/tmp")
        self.head: Node | None = None
        self.workers: list[Node] = []

    # -- addresses ---------------------------------------------------------------------
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def address(self) -> str:
        """The job API (what RAY_ADDRESS names for `ray job submit`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    # -- starting ------------------------------------------------------------------------
    def _start(self, name: str, private: list[str], args: list[str]) -> Node:
        log = open(self.workdir / f"{name}.log", "wb")
        mounts = " && ".join(self._private_mounts(d) for d in private)
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"{mounts} && exec {RAY} start --block --disable-usage-stats --node-ip-address=127.0.0.1 "
            f"--object-store-memory={OBJECT_STORE_BYTES} " + " ".join(args),
        ]
        process = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_stop_with_parent,
        )
        return Node(name, process)

    def _private_mounts(self, folder: str) -> str:
        """Shell commands that put a private tmpfs over ``folder`` in a node's mount
        namespace, keeping what the node runs from (under ``folder``) visible: the original
        folder is bound to a holding point first, then each kept path bound back."""
        kept = [p for p in KEPT if p == folder or p.startswith(folder.rstrip("/") + "/")]
        steps = [f"mkdir -p {folder}"]
        if kept:
            steps.append(f"mount --bind {folder} {self.holding}")
        steps.append(f"mount -t tmpfs -o size=2g tmpfs {folder}")
        for path in kept:
            rel = os.path.relpath(path, folder)
            steps.append(f"mkdir -p {path} && mount --bind {self.holding}/{rel} {path}")
        return " && ".join(steps)

    def start(self, timeout: float = 120) -> LocalCluster:
        """Start the head and every worker node; return when all are alive."""
        os.makedirs("/tmp/ray", exist_ok=True)  # the head's private mount point
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.head = self._start(
            "head",
            ["/tmp/ray"],
            [
                "--head",
                f"--port={self.gcs_port}",
                "--num-cpus=0",
                "--num-gpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ],
        )
        self._wait_for_port(self.gcs_port, timeout)
        for i, cpus in enumerate(self.worker_cpus):
            self.add_worker(cpus, name=f"worker-{chr(ord('a') + i)}")
        self.wait_for_nodes(1 + len(self.worker_cpus), timeout)
        self._wait_for_port(self.dashboard_port, timeout)
        return self

    def add_worker(self, cpus: float, name: str | None = None) -> Node:
        """Start one more worker node (also: bring a lost node back)."""
        name = name or f"worker-{len(self.workers)}"
        resources = {f"node:{name}": 1}
        node = self._start(
            name,
            ["/tmp"],
            [
                f"--address={self.gcs_address}",
                f"--num-cpus={cpus:g}",
                "--num-gpus=0",
                f"--resources='{json.dumps(resources)}'",
            ],
        )
        node.resources = resources
        self.workers.append(node)
        return node

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                self._check_alive()
                time.sleep(0.5)
        raise TimeoutError(f"port {port} did not open in {timeout}s; see {self.workdir}/*.log")

    def _check_alive(self) -> None:
        for node in [self.head, *self.workers]:
            if node is not None and node.process.poll() is not None:
                log = (self.workdir / f"{node.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Ray node {node.name} exited ({node.process.returncode}):\n{log}")

    def client_env(self) -> dict[str, str]:
        """What a client (`ray job submit`, the state API) needs in its environment."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def use_as_client(self) -> None:
        """Point this process's Ray clients (job API, state API) at this cluster."""
        from ray._raylet import AuthenticationTokenLoader, Config

        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes, from the state API over HTTP."""
        from ray.util.state import list_nodes

        self.use_as_client()
        return [
            n
            for n in list_nodes(address=self.address, raise_on_missing_output=False, timeout=10)
            if str(getattr(n, "state", "")).upper() == "ALIVE"
        ]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Wait until ``count`` nodes are alive."""
        deadline = time.time() + timeout
        seen = 0
        while time.time() < deadline:
            self._check_alive()
            try:
                seen = len(self.alive_nodes())
            except Exception:  # noqa: BLE001 - the dashboard is still starting
                seen = 0
            if seen == count:
                return
            time.sleep(1)
        raise TimeoutError(f"{seen} of {count} Ray nodes alive after {timeout}s; see {self.workdir}/*.log")

    # -- stopping ------------------------------------------------------------------------
    def kill_worker(self, node: Node) -> None:
        """The node disappears: its raylet and workers die at once (SIGKILL)."""
        kill_tree(node.pid, graceful=False)
        self.workers.remove(node)

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), by process id."""
        for node in list(self.workers):
            kill_tree(node.pid)
        self.workers.clear()
        if self.head is not None:
            kill_tree(self.head.pid)
            self.head = None
        try:
            os.rmdir(self.holding)  # an empty mount point on this machine's disk
        except OSError:
            pass

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """Start a head, two worker nodes and an S3 server; print how to use them; Ctrl-C stops all."""
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    host, port = s3.get_host_and_port()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    workdir = Path(f"/tmp/raybm-cluster-{os.getpid()}")
    cluster = LocalCluster(workdir, env=creds)
    try:
        cluster.start()
        import boto3

        boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            **{k.lower(): v for k, v in creds.items() if k != "AWS_DEFAULT_REGION"},
            region_name="us-east-1",
        ).create_bucket(Bucket="raybm")
        print(
            f"""3 Ray nodes up (head: 0 CPUs; workers: {", ".join(f"{c:g}" for c in cluster.worker_cpus)} CPUs).
  export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.token}
  S3: endpoint http://{host}:{port}, bucket 'raybm'; storage.root=s3://raybm/results storage.s3_endpoint_url=http://{host}:{port}
  node logs: {workdir}
Ctrl-C stops everything.""",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
