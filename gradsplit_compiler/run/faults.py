"""What went wrong in a pipeline step: which action, which stage, which task of a cluster.

When one task of a cluster dies, this process's calls to every task can fail, and which
device thread reports first is a race; a task that hangs makes no call fail at all. These
functions turn what the step engine saw into one ``GradSplitError`` naming the task that no
longer answers (found by asking the network, then by a trivial op with a deadline), the
stages that ran there and the actions still running.

>>> task_label("/job:worker/replica:0/task:1/device:CPU:0")
"task 1 of job 'worker' (/job:worker/replica:0/task:1/device:CPU:0)"
>>> task_label("/CPU:0")
'device /CPU:0'
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from gradsplit_compiler._tf_internal import connected_server_def
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.run.devices import StageRunner, device_label, is_remote
from gradsplit_compiler.run.schedules import Action

__all__ = [
    "GRACE_AFTER_FAILURE",
    "RESTART",
    "RESTART_AND_RESTORE",
    "action_failure",
    "blame",
    "refuses_connections",
    "task_failure",
    "task_label",
    "timeout_error",
    "unreachable",
    "update_timeout_error",
    "wait_for",
]

# Seconds a step (or an optimizer update) still waits for the other devices once one has
# failed: when a task of a cluster dies, calls to the other tasks can hang rather than fail.
GRACE_AFTER_FAILURE = 2.0

# What a caller does after a task died: the last words of every error about one.
RESTART = "restart the cluster, connect again and build a new pipeline"
RESTART_AND_RESTORE = (
    "the stage-resident variables and optimizer state held on that task are lost with it: "
    "restart the cluster, connect again, build the pipeline again and restore its last "
    "checkpoint (pipeline.restore)")


def task_label(device: str) -> str:
    """``task N of job 'J' (device)`` for a task of a cluster, ``device D`` otherwise."""
    spec = tf.DeviceSpec.from_string(device)
    if spec.job in (None, "localhost"):
        return f"device {device}"
    return f"task {spec.task} of job {spec.job!r} ({device})"


def action_failure(exc: BaseException, action: Action | None, device_index: int,
                   runner: StageRunner) -> BaseException:
    """The error to report for ``exc``, raised by ``action`` (``None``: while refreshing the
    variable replicas) of ``runner`` on device ``device_index``.

    A TensorFlow error on a task of a cluster becomes a ``GradSplitError`` naming the task,
    the stage and the action; any other error is returned with a note naming the action and
    its device.
    """
    if isinstance(exc, tf.errors.OpError) and is_remote(runner.device):
        doing = (f"running {action}" if action is not None
                 else "refreshing its variable replicas")
        return task_failure(exc, runner.device, doing, [runner.index])
    if action is not None and hasattr(exc, "add_note"):
        exc.add_note(f"(while running {action} on device {device_index}: "
                     f"{device_label(runner.device)})")
    return exc


def task_failure(exc: BaseException, device: str, doing: str,
                 stages: Sequence[int]) -> GradSplitError:
    """``exc``, a TensorFlow error on the task of ``device`` while ``doing`` something for
    ``stages``, as a ``GradSplitError`` naming the task and the stages (``exc`` its
    cause)."""
    message = exc.message if isinstance(exc, tf.errors.OpError) else str(exc)
    error = GradSplitError(
        f"{task_label(device)} failed while {doing} of stage "
        f"{', '.join(map(str, stages))}: {type(exc).__name__}: {_first_line(message)}.")
    error.__cause__ = exc
    return error


def blame(errors: Sequence[BaseException], runners: Sequence[StageRunner],
          timeout: float | None, advice: str = RESTART) -> BaseException:
    """The error to raise for a failed step: when tasks of a cluster failed, the one about a
    task that no longer answers (when one task dies, calls to the others can fail too, and
    which thread reports first is a race); otherwise the first error. ``advice`` ends the
    message about a task that no longer answers (``RESTART``, or ``RESTART_AND_RESTORE``
    for a pipeline that holds training state on the tasks)."""
    remote = [e for e in errors if isinstance(e, GradSplitError)
              and isinstance(e.__cause__, tf.errors.OpError)]
    if not remote:
        return errors[0]
    used = list(dict.fromkeys(r.device for r in runners))
    wait = 5.0 if timeout is None else min(5.0, timeout)
    remote_used = [d for d in used if is_remote(d)]
    # One dead task breaks this process's calls to every task, so ask the network first:
    # a task whose port refuses connections is gone. A process killed a moment ago may
    # still hold its port while the system tears it down: ask again for a little while.
    asked_until = time.monotonic() + min(1.0, wait)
    dead = [d for d in remote_used if refuses_connections(d)]
    while not dead and time.monotonic() < asked_until:
        time.sleep(0.1)
        dead = [d for d in remote_used if refuses_connections(d)]
    if not dead:
        dead = unreachable(remote_used, wait)
    if not dead or len(dead) == len(used):
        return remote[0]
    stages = [r.index for r in runners if r.device in dead]
    tasks = ", ".join(task_label(d) for d in dead)
    error = GradSplitError(
        f"{tasks} no longer answers (it died or stopped answering) during the step; "
        f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))} ran "
        f"there. First failure: {remote[0]} The step was abandoned and no variable of "
        f"the split changed; {advice}.")
    error.__cause__ = remote[0].__cause__
    return error


def timeout_error(timeout: float, running: Sequence[tuple[Action, str, float]],
                  waiting: Sequence[Action], devices: Sequence[str],
                  probe_time: float, advice: str = RESTART) -> GradSplitError:
    """The error for a step that outlived ``timeout``: ``running`` holds ``(action, device,
    seconds it has run)`` for every action still running, ``waiting`` the first action of
    each device that has not started any; the tasks among ``devices`` that do not answer
    within ``probe_time`` are named first."""
    parts = [
        f"{action} of stage {action.stage} on {task_label(device)}, running for {seconds:.1f} s"
        for action, device, seconds in running
    ]
    dead = unreachable([d for d in dict.fromkeys(devices) if is_remote(d)], probe_time)
    if dead:
        parts.insert(0, f"{', '.join(task_label(d) for d in dead)} does not answer")
    what = "; ".join(parts) if parts else (
        "nothing was running: waiting for " + ", ".join(map(str, waiting or ["?"])))
    return GradSplitError(
        f"the pipeline step did not finish within timeout={timeout:g} s: "
        f"{what}. A worker that died or stopped answering does this. The step was "
        f"abandoned and no variable of the split changed; {advice} (or raise timeout= if "
        f"the step is just slow)."
    )


def update_timeout_error(timeout: float, pending: Sequence[tuple[str, Sequence[int]]],
                         probe_time: float, advice: str = RESTART_AND_RESTORE
                         ) -> GradSplitError:
    """The error for an optimizer update (the end of ``train_step``) that outlived
    ``timeout``: ``pending`` holds ``(device, its stages)`` for every device whose update
    had not finished; those among them that do not answer within ``probe_time`` are named
    first."""
    dead = unreachable([d for d, _ in pending if is_remote(d)], probe_time)
    parts = [f"{', '.join(task_label(d) for d in dead)} does not answer"] if dead else []
    parts += [f"the update of stage {', '.join(map(str, stages))} on {task_label(device)} "
              "has not finished" for device, stages in pending]
    return GradSplitError(
        f"the optimizer update of train_step did not finish within timeout={timeout:g} s: "
        f"{'; '.join(parts)}. A worker that died or stopped answering does this; devices "
        f"that finished may have applied their update, and your own variables did not "
        f"change; {advice} (or raise timeout= if the update is just slow)."
    )


def wait_for(tensors: Sequence[Any]) -> None:
    """Block until remote ``tensors`` exist: a remote call returns before its task has run
    it, and its failure (or a hang) would surface later, in someone else's action. Asking
    a handle for its shape waits for the task."""
    for t in tensors:
        if t is not None:
            t.shape  # noqa: B018 - resolving the remote handle is the point


def refuses_connections(device: str) -> bool:
    """Whether the server of ``device``'s task refuses TCP connections (its process is gone).
    ``False`` when unknown; a stopped (hung) process still accepts them."""
    spec = tf.DeviceSpec.from_string(device)
    server_def = connected_server_def()
    if server_def is None:
        return False
    for job in server_def.cluster.job:
        if job.name == spec.job and (spec.task or 0) in job.tasks:
            host, _, port = job.tasks[spec.task or 0].rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    return False
            except ConnectionRefusedError:
                return True
            except (OSError, ValueError):
                return False
    return False


def unreachable(devices: Sequence[str], seconds: float) -> list[str]:
    """Those of ``devices`` that do not run a trivial op within ``seconds``."""
    answered: set[str] = set()

    def probe(device: str) -> None:
        try:
            with tf.device(device):
                tf.identity(tf.constant(0.0)).numpy()  # a copy back waits for the task
            answered.add(device)
        except Exception:
            pass

    threads = [threading.Thread(target=probe, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [d for d in devices if d not in answered]


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "(no message)"
