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

A starter process imports TensorFlow once and forks every task's process from it: an import
takes seconds of CPU, which ``n`` workers started apart would pay ``n`` times, and every
restart after a fault again. This process keeps one starter (per environment) for all the
clusters it makes, and it ends with this process. The tasks run in their own process
groups and are stopped by ``stop()``, by leaving the ``with`` block, and at interpreter exit
(``atexit``): SIGTERM, then SIGKILL after a grace period. A real cluster needs none of
this: start a server per machine and connect to its ``ClusterSpec`` (see ``connect``).
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
    """What the starter reports of one cluster's tasks: ``ready`` (with the task's pid) once a
    task serves, ``exit`` (with its code) once it has exited (the starter reaps its tasks),
    and ``closed`` once the starter itself is gone."""

    def __init__(self, cond: threading.Condition, tasks: int):
        self._cond = cond
        self.tasks = tasks
        self.pids: dict[int, int] = {}
        self.exits: dict[int, int] = {}
        self.closed = False

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


class _Starter:
    """A process that has imported TensorFlow and forks worker tasks on request, shared by
    every ``LocalCluster`` this process makes with the same environment: the import (seconds
    of CPU) is paid once, not once per task nor once per cluster (a restart after a fault
    costs a fork). It reads ``start CLUSTER TASK SPEC`` and ``stop CLUSTER`` lines on its
    stdin and writes ``ready CLUSTER TASK PID`` and ``exit CLUSTER TASK CODE`` lines; it ends
    when this process closes its stdin (by exiting, however it exits), and its tasks end with
    it."""

    _by_env: dict[tuple, _Starter] = {}
    _lock = threading.Lock()

    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradsplit_compiler.run.cluster"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True, text=True,
        )
        self._cond = threading.Condition()
        self._sending = threading.Lock()
        self._clusters: dict[int, _StarterEvents] = {}
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def for_env(cls, env: dict[str, str]) -> _Starter:
        key = tuple(sorted(env.items()))
        with cls._lock:
            starter = cls._by_env.get(key)
            if starter is None or starter.process.poll() is not None:
                starter = cls._by_env[key] = cls(env)
            return starter

    def start(self, spec: dict) -> tuple[int, _StarterEvents]:
        """Ask for every task of ``spec``; the cluster's number and its events."""
        with self._cond:
            number, self._next = self._next, self._next + 1
            events = self._clusters[number] = _StarterEvents(self._cond, len(spec[JOB]))
            if self.process.poll() is not None:
                events.closed = True
                return number, events
        text = json.dumps(spec)
        self._send("".join(f"start {number} {task} {text}\n"
                           for task in range(len(spec[JOB]))))
        return number, events

    def stop(self, number: int) -> None:
        """Have the starter kill whatever it started, or will start, for cluster ``number``."""
        self._send(f"stop {number}\n")

    def _send(self, text: str) -> None:
        with self._sending:
            try:
                self.process.stdin.write(text)
                self.process.stdin.flush()
            except (ValueError, OSError):  # the starter is gone: the events say so
                pass

    def _read(self) -> None:
        for line in self.process.stdout:
            kind, number, task, value = (line.split() + [""] * 4)[:4]
            with self._cond:
                events = self._clusters.get(int(number)) if number.isdigit() else None
                if events is not None and kind == "ready":
                    events.pids[int(task)] = int(value)
                elif events is not None and kind == "exit":
                    events.exits[int(task)] = int(value)
                    if len(events.exits) == events.tasks:
                        # every task of that cluster is gone: nothing more will come for it
                        del self._clusters[int(number)]
                self._cond.notify_all()
        with self._cond:
            for events in self._clusters.values():
                events.closed = True
            self._cond.notify_all()


class LocalCluster:
    """``num_workers`` TensorFlow servers in processes of their own, on loopback ports.

    Each task's process is forked from a starter process that has imported TensorFlow (one
    per environment, shared by every cluster this process makes), so a cluster of ``n``
    workers costs one TensorFlow import rather than ``n`` (seconds each), and a restart none.

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
        self._starter = _Starter.for_env(child_env)
        self._number, self._events = self._starter.start(self.spec)
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
                code = self._starter.process.wait()
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
        """Stop every worker: SIGTERM to its process group, SIGKILL after ``stop_timeout``.
        Safe to call twice."""
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
        self._starter.stop(self._number)  # and any task it had not reported yet
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


def _serve(spec: dict, task: int, starter: int, ready: int) -> None:
    """A task's process, just forked from the starter: serve ``task`` of ``spec`` in a process
    group of its own until killed or the starter is gone; ``ready`` (a pipe to the starter)
    gets ``ready`` once the server is up."""
    import tensorflow as tf

    os.setsid()
    _exit_when_parent_is_not(starter)
    server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name=JOB, task_index=task,
                                  protocol="grpc", start=True)
    os.write(ready, b"ready")
    os.close(ready)
    server.join()


def _forks() -> bool:
    """Whether the starter forks its tasks: on Linux. Elsewhere (macOS, where a process forked
    after system frameworks loaded may crash) each task is a new interpreter, as
    ``multiprocessing`` does by default there; ``GSC_CLUSTER_SPAWN=1`` asks for that on Linux
    too (the tests use it to run that path)."""
    return sys.platform.startswith("linux") and os.environ.get("GSC_CLUSTER_SPAWN") != "1"


def _run_starter() -> None:
    """The starter (``_Starter``): one thread, so that forking is safe; commands on stdin,
    reports on stdout (written with ``os.write``, one line at a time)."""
    import selectors

    forks = _forks()
    if forks:
        import tensorflow  # noqa: F401  (imported once here, forked into every task)

    starter = os.getpid()
    spawned: list[subprocess.Popen] = []  # kept: reaped below, not by their objects
    tasks: dict[int, tuple[int, int]] = {}  # pid -> (cluster, task)
    stopped: set[int] = set()

    def report(line: str) -> None:
        os.write(1, (line + "\n").encode())

    def reap() -> None:
        while tasks:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in tasks:
                number, task = tasks.pop(pid)
                report(f"exit {number} {task} {os.waitstatus_to_exitcode(status)}")

    def start(number: int, task: int, spec: dict) -> None:
        read, write = os.pipe()
        if not forks:
            spawned.append(subprocess.Popen(
                [sys.executable, "-m", "gradsplit_compiler.run.cluster", "serve",
                 json.dumps(spec), str(task), str(starter), str(write)],
                pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
            pid = spawned[-1].pid
        else:
            pid = os.fork()
        if pid == 0:  # the task: only this thread was copied
            try:
                os.close(read)
                sel.close()
                quiet = os.open(os.devnull, os.O_RDWR)  # the starter's pipes are not ours
                os.dup2(quiet, 0)
                os.dup2(quiet, 1)
                _serve(spec, task, starter, write)
            finally:
                os._exit(1)
        os.close(write)
        tasks[pid] = (number, task)
        waiting[read] = (number, task, pid)
        sel.register(read, selectors.EVENT_READ)

    def command(line: str) -> None:
        words = line.split(maxsplit=3)
        if words[0] == "start" and int(words[1]) not in stopped:
            start(int(words[1]), int(words[2]), json.loads(words[3]))
        elif words[0] == "stop":
            stopped.add(int(words[1]))
            for pid, (number, _) in list(tasks.items()):
                if number == int(words[1]):
                    _kill_group(pid)

    waiting: dict[int, tuple[int, int, int]] = {}  # a task's ready pipe -> who it is
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(0, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select(0.2):
                if key.fd == 0:
                    chunk = os.read(0, 1 << 16)
                    if not chunk:  # the client is gone: so are we, and our tasks after us
                        os._exit(0)
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        command(line.decode())
                else:
                    number, task, pid = waiting.pop(key.fd)
                    sel.unregister(key.fd)
                    said = os.read(key.fd, 16)
                    os.close(key.fd)
                    if said == b"ready":
                        report(f"ready {number} {task} {pid}")
            reap()


def _kill_group(pid: int) -> None:
    """SIGKILL to a task's process group, or to the task alone before it made its group."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:  # a task the starter spawned rather than forked
        _serve(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        os._exit(1)
    _run_starter()
