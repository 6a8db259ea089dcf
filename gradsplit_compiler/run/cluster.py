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

One starter process imports TensorFlow once and forks every task's process from it: an
import takes seconds of CPU, which ``n`` workers started apart would pay ``n`` times. The
tasks run in their own process groups and are stopped by ``stop()``, by leaving the ``with``
block, and at interpreter exit (``atexit``): SIGTERM, then SIGKILL after a grace period.
A real cluster needs none of this: start a server per machine and connect to its
``ClusterSpec`` (see ``connect``).
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
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from gradsplit_compiler.errors import GradSplitError

__all__ = ["LocalCluster", "WorkerProcess", "connect", "task_devices"]

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


class WorkerProcess:
    """The process of one worker task of a ``LocalCluster``.

    Its parent is the cluster's starter process, not this one, so it is not a
    ``subprocess.Popen``; it answers the same questions: ``pid``, ``poll()``, ``wait()``,
    ``send_signal(sig)``, ``kill()``, ``returncode``.
    """

    def __init__(self, task: int, pid: int, events: _StarterEvents):
        self.task, self.pid = task, pid
        self._events = events

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has exited (negative: the signal that ended it; -1 when its
        starter process was gone first, which takes the code with it)."""
        code = self._events.exit_code(self.task)
        if code is None and self._events.closed and not _exists(self.pid):
            code = -1
        return code

    def poll(self) -> int | None:
        """``returncode``: ``None`` while it runs."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait until it has exited; its exit code. ``subprocess.TimeoutExpired`` after
        ``timeout`` seconds."""
        if not self._events.wait_exit(self.task, self.pid, timeout):
            raise subprocess.TimeoutExpired(f"worker task {self.task}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """``sig`` to its process group (the task and anything it started)."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"WorkerProcess(task={self.task}, pid={self.pid}, returncode={self.returncode})"


class _StarterEvents:
    """What the starter process reports on its stdout, read by a thread of this process:
    ``ready TASK PID`` once a task serves, ``exit TASK CODE`` once it has exited (the starter
    reaps its tasks), then end of file when the starter itself is gone."""

    def __init__(self, stream):
        self._cond = threading.Condition()
        self.pids: dict[int, int] = {}
        self.exits: dict[int, int] = {}
        self.closed = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            kind, task, value = (line.split() + ["", "", ""])[:3]
            with self._cond:
                if kind == "ready":
                    self.pids[int(task)] = int(value)
                elif kind == "exit":
                    self.exits[int(task)] = int(value)
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def exit_code(self, task: int) -> int | None:
        with self._cond:
            return self.exits.get(task)

    def wait_exit(self, task: int, pid: int, timeout: float | None) -> bool:
        """Whether task ``task`` exited within ``timeout`` seconds (once the starter is gone,
        its tasks follow it within a second: then ``pid`` is watched)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._cond.wait_for(lambda: task in self.exits or self.closed, timeout):
                if task in self.exits:
                    return True
        while _exists(pid):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def wait_until(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate() or self.closed, timeout)


class LocalCluster:
    """``num_workers`` TensorFlow servers in processes of their own, on loopback ports.

    One starter process imports TensorFlow once and forks every task's process from it, so a
    cluster of ``n`` workers costs one TensorFlow import rather than ``n`` (seconds each).

    Attributes
    ----------
    cluster_spec : tf.train.ClusterSpec
        ``{"worker": ["localhost:PORT", ...]}``.
    devices : list of str
        ``/job:worker/replica:0/task:N/device:CPU:0`` for each task ``N``.
    processes : list of WorkerProcess
        The worker processes, by task (``pid``, ``poll()``, ``wait()``, ``kill()``, as a
        ``subprocess.Popen``).
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
        self.processes: list[WorkerProcess] = []
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        child_env.pop("TF_CONFIG", None)
        self._starter = subprocess.Popen(
            [sys.executable, "-m", "gradsplit_compiler.run.cluster", json.dumps(self.spec),
             str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=child_env, start_new_session=True, text=True,
        )
        self._events = _StarterEvents(self._starter.stdout)
        _LIVE.add(self)
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        events = self._events
        events.wait_until(lambda: len(events.pids) == self.num_workers or events.exits,
                          timeout)
        self.processes = [WorkerProcess(task, pid, events)
                          for task, pid in sorted(events.pids.items())]
        if len(events.pids) == self.num_workers:
            return
        waiting = [t for t in range(self.num_workers) if t not in events.pids]
        if events.exits or events.closed:
            task = min(events.exits, default=waiting[0])
            code = events.exits.get(task)
            if code is None:
                code = self._starter.wait()
            raise GradSplitError(
                f"worker task {task} ({self.addresses[task]}) exited with code "
                f"{code} before its server started."
            )
        raise GradSplitError(
            f"worker tasks {waiting} did not start within {timeout:g} s; raise "
            "start_timeout or check that TensorFlow imports."
        )

    @property
    def cluster_spec(self):
        import tensorflow as tf

        return tf.train.ClusterSpec(self.spec)

    def connect(self) -> list[str]:
        """Join this process to the cluster as its client (``connect(self.cluster_spec)``);
        returns ``devices``."""
        if not self.running():
            dead = [p.task for p in self.processes if p.poll() is not None]
            raise GradSplitError(f"cannot connect: worker tasks {dead} are not running.")
        connect(self.cluster_spec)
        return list(self.devices)

    def running(self) -> bool:
        """Whether every worker process is alive."""
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def kill(self, task: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to worker ``task`` (SIGKILL: a crash; SIGSTOP: a hang)."""
        self.processes[task].send_signal(sig)

    def stop(self) -> None:
        """Stop every worker: SIGTERM to its process group, SIGKILL after ``stop_timeout``;
        then the starter process. Safe to call twice."""
        for p in self.processes:
            p.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        for p in self.processes:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # anything the worker itself started
            except (ProcessLookupError, PermissionError):
                pass
        starter = self._starter
        if starter.poll() is None:
            _signal_group(starter, signal.SIGTERM)
            try:
                starter.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _signal_group(starter, signal.SIGKILL)
                starter.wait()
        if starter.stdout is not None:
            starter.stdout.close()
        _LIVE.discard(self)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"LocalCluster({self.num_workers} workers at {self.addresses}, {state})"


def _exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie not yet reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no /proc: what kill(pid, 0) said
        return True


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


def _exit_when_parent_is_not(parent: int) -> None:
    """A thread that ends this process once ``parent`` is no longer its parent."""
    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()


def _start_tasks(spec_json: str, client: int) -> None:
    """The starter process: import TensorFlow once, fork one process per task of the spec
    (each serves its task, in a process group of its own), report ``ready``/``exit`` of each
    on stdout, and end with the last task, or with ``client`` (so that a client killed with
    SIGKILL leaves no orphan behind: the tasks end with their starter)."""
    _exit_when_parent_is_not(client)
    import tensorflow as tf

    spec = json.loads(spec_json)
    starter = os.getpid()
    tasks: dict[int, int] = {}
    for task in range(len(spec[JOB])):
        pid = os.fork()
        if pid == 0:  # the task's process: only this thread was copied
            try:
                os.setsid()
                _exit_when_parent_is_not(starter)
                server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name=JOB,
                                              task_index=task, protocol="grpc", start=True)
                print(f"ready {task} {os.getpid()}", flush=True)
                server.join()
            finally:
                os._exit(1)
        tasks[pid] = task
    while tasks:
        pid, status = os.wait()
        if pid in tasks:
            print(f"exit {tasks.pop(pid)} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    _start_tasks(sys.argv[1], int(sys.argv[2]))
