"""A TensorFlow cluster on this machine, for trying ``gsc.pipeline`` across processes.

``LocalCluster(n)`` starts ``n`` worker processes, each a ``tf.distribute.Server`` (gRPC) of
job ``"worker"`` on a loopback port chosen free at start; ``connect()`` joins this process to
them as the client, after which ``cluster.devices`` (``/job:worker/replica:0/task:N/device:
CPU:0``) are devices like any other::

    with LocalCluster(2) as cluster:
        cluster.connect()
        pipe = gsc.pipeline(split, 4, "1f1b", devices=cluster.devices,
                            loss_reduction="mean", timeout=30)
        value, grads = pipe.step(x)

Connecting changes the eager context of the whole process (TensorFlow knows one cluster per
process): connect from a process of its own (a script, a subprocess), not from one that also
runs unrelated TensorFlow work.

The workers run in their own process groups (``start_new_session``) and are stopped by
``stop()``, by leaving the ``with`` block, and at interpreter exit (``atexit``): SIGTERM, then
SIGKILL after a grace period. A real cluster needs none of this: start a server per machine
and connect to its ``ClusterSpec`` (see ``connect``).
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping
from typing import Any

from gradsplit_compiler.errors import GradSplitError

__all__ = ["LocalCluster", "connect", "task_devices"]

JOB = "worker"
_LIVE: weakref.WeakSet = weakref.WeakSet()


def task_devices(cluster_spec: Any, job: str = JOB) -> list[str]:
    """The CPU device of every task of ``job`` in ``cluster_spec`` (a ``tf.train.ClusterSpec``
    or a dict ``{job: [host:port, ...]}``), in task order."""
    spec = cluster_spec.as_dict() if hasattr(cluster_spec, "as_dict") else dict(cluster_spec)
    tasks = spec[job]
    indices = sorted(tasks) if isinstance(tasks, Mapping) else range(len(tasks))
    return [f"/job:{job}/replica:0/task:{i}/device:CPU:0" for i in indices]


def connect(cluster_spec: Any = None) -> list[str]:
    """Join this process to a TensorFlow cluster as its client; the worker devices.

    ``cluster_spec``: a ``tf.train.ClusterSpec``, a dict ``{"worker": ["host:port", ...]}``,
    a cluster resolver, or ``None`` to read the ``cluster`` entry of the ``TF_CONFIG``
    environment variable. Each listed task must run a ``tf.distribute.Server`` of that
    spec. The client takes job ``"localhost"`` on a free port of its own, which TensorFlow
    tells the workers when it connects; the workers do not list it.

    Connecting again (to a restarted cluster, after a fault) is safe for what the process
    traced before: every function registered until then is kept, so that objects collected
    later (the old split, the old pipeline, your own functions) do not ask the new tasks to
    remove functions they never had (TensorFlow would fail the next remote call with "Tried
    to remove non-existent function").
    """
    import tensorflow as tf

    from gradsplit_compiler._tf_internal import pin_registered_functions

    if cluster_spec is None:
        config = os.environ.get("TF_CONFIG")
        if not config:
            raise GradSplitError(
                "connect() got no cluster_spec and TF_CONFIG is not set; pass a "
                "tf.train.ClusterSpec or {'worker': ['host:port', ...]}, or set TF_CONFIG "
                "to '{\"cluster\": {\"worker\": [...]}}'."
            )
        cluster_spec = json.loads(config)["cluster"]
    if hasattr(cluster_spec, "cluster_spec"):  # a cluster resolver
        cluster_spec = cluster_spec.cluster_spec()
    if not isinstance(cluster_spec, tf.train.ClusterSpec):
        cluster_spec = tf.train.ClusterSpec(dict(cluster_spec))
    # Garbage first, then pin what is left: a function collected after this connect would
    # be removed from the new cluster's tasks, which never had it, and that failure would
    # surface in the next remote call (after a restart: the first step of the new pipeline).
    gc.collect()
    pin_registered_functions()
    tf.config.experimental_connect_to_cluster(cluster_spec)
    return task_devices(cluster_spec)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (held open together so
    they differ; a worker binds its port right after)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """``num_workers`` TensorFlow servers in processes of their own, on loopback ports.

    Attributes
    ----------
    cluster_spec : tf.train.ClusterSpec
        ``{"worker": ["localhost:PORT", ...]}``.
    devices : list of str
        ``/job:worker/replica:0/task:N/device:CPU:0`` for each task ``N``.
    processes : list of subprocess.Popen
        The worker processes, by task.
    """

    def __init__(self, num_workers: int, *, start_timeout: float = 60.0,
                 stop_timeout: float = 5.0, env: Mapping[str, str] | None = None):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise GradSplitError(f"num_workers must be a positive int; got {num_workers!r}.")
        self.num_workers = num_workers
        self.stop_timeout = stop_timeout
        self.addresses = [f"localhost:{p}" for p in _free_ports(num_workers)]
        self.spec = {JOB: list(self.addresses)}
        self.devices = task_devices(self.spec)
        self.processes: list[subprocess.Popen] = []
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        child_env.pop("TF_CONFIG", None)
        _LIVE.add(self)
        try:
            for task in range(num_workers):
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "gradsplit_compiler.run.cluster", json.dumps(self.spec),
                     str(task), str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    env=child_env, start_new_session=True, text=True,
                ))
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import selectors

        deadline = time.monotonic() + timeout
        waiting = {p.stdout: task for task, p in enumerate(self.processes)}
        with selectors.DefaultSelector() as sel:
            for stream in waiting:
                sel.register(stream, selectors.EVENT_READ)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GradSplitError(
                        f"worker tasks {sorted(waiting.values())} did not start within "
                        f"{timeout:g} s; raise start_timeout or check that TensorFlow imports."
                    )
                for key, _ in sel.select(left):
                    line = key.fileobj.readline()
                    task = waiting[key.fileobj]
                    if line.startswith("ready"):
                        sel.unregister(key.fileobj)
                        del waiting[key.fileobj]
                    elif not line:
                        code = self.processes[task].wait()
                        raise GradSplitError(
                            f"worker task {task} ({self.addresses[task]}) exited with code "
                            f"{code} before its server started."
                        )

    @property
    def cluster_spec(self):
        import tensorflow as tf

        return tf.train.ClusterSpec(self.spec)

    def connect(self) -> list[str]:
        """Join this process to the cluster as its client (``connect(self.cluster_spec)``);
        returns ``devices``."""
        if not self.running():
            dead = [t for t, p in enumerate(self.processes) if p.poll() is not None]
            raise GradSplitError(f"cannot connect: worker tasks {dead} are not running.")
        connect(self.cluster_spec)
        return list(self.devices)

    def running(self) -> bool:
        """Whether every worker process is alive."""
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def kill(self, task: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to worker ``task`` (SIGKILL: a crash; SIGSTOP: a hang)."""
        os.killpg(self.processes[task].pid, sig)

    def stop(self) -> None:
        """Stop every worker: SIGTERM to its process group, SIGKILL after ``stop_timeout``.
        Safe to call twice."""
        for p in self.processes:
            if p.poll() is None:
                _signal_group(p, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        for p in self.processes:
            _signal_group(p, signal.SIGKILL)  # anything the worker itself started
            if p.stdout is not None:
                p.stdout.close()
        _LIVE.discard(self)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"LocalCluster({self.num_workers} workers at {self.addresses}, {state})"


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


def _serve(spec_json: str, task: int, parent: int) -> None:
    """A worker process: one ``tf.distribute.Server``, until killed or its parent is gone
    (so that a client killed with SIGKILL leaves no orphan behind)."""
    import threading

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    import tensorflow as tf

    spec = tf.train.ClusterSpec(json.loads(spec_json))
    server = tf.distribute.Server(spec, job_name=JOB, task_index=task, protocol="grpc",
                                  start=True)
    print("ready", flush=True)
    server.join()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
