"""Where a pipeline's stages run: device names, variable replicas, and the callables each
device runs for its stage.

A name such as ``"/CPU:1"`` is resolved to the full name TensorFlow places ops on, and a
device that does not exist is refused (TensorFlow would quietly run elsewhere). A compiled
stage cannot read a variable held on another device, so each such variable gets a replica on
the stage's device (``plan_replicas``); ``stage_runner`` binds a stage's forward and backward
to its device and replicas. Replicas and the wrappers of stages on cluster tasks are cached
per split, so that pipelines over one split share their XLA programs.

>>> is_remote("/job:worker/replica:0/task:1/device:CPU:0"), is_remote("/CPU:0")
(True, False)
>>> device_label("/job:localhost/replica:0/task:0/device:CPU:1")
'CPU:1'
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from gradsplit_compiler._tf_internal import connected_server_def
from gradsplit_compiler.core.split import Split
from gradsplit_compiler.core.stage import StagePrograms
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.util import forwarding

__all__ = [
    "StageRunner",
    "default_device",
    "device_label",
    "is_grid",
    "is_remote",
    "keep_alive",
    "plan_replicas",
    "resolve_device",
    "resolve_devices",
    "resolve_grid",
    "same_device",
    "stage_runner",
]

_DEVICE_PARTS = ("job", "replica", "task", "device_type", "device_index")


@dataclass(frozen=True)
class StageRunner:
    """What one device needs to run one stage: its callables (``backward_input`` and
    ``backward_weight``, B and W, for a schedule that splits the backward), the graph names
    it reads and writes, and the variable replicas on its device it refreshes before a
    step, as ``(variable index, replica)``."""

    index: int
    device: str
    forward: Any
    backward: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    output_dtypes: tuple[tf.DType, ...]
    variable_indices: tuple[int, ...]
    replicas: tuple[tuple[int, tf.Variable], ...]
    backward_input: Any = None
    backward_weight: Any = None


# -- names ------------------------------------------------------------------------------------


def is_remote(device: str) -> bool:
    """Whether ``device`` belongs to another process of a cluster (a task of a job)."""
    job = tf.DeviceSpec.from_string(device).job
    return job not in (None, "localhost")


def same_device(a: str, b: str) -> bool:
    """Whether the device names ``a`` and ``b`` name one device (``False`` if either is
    empty)."""
    if not a or not b:
        return False
    x, y = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return _parts_agree(x, y, every=True)


def _parts_agree(wanted: tf.DeviceSpec, got: tf.DeviceSpec, *, every: bool) -> bool:
    """Whether ``got`` matches ``wanted`` in every part (``every``), or in each part that
    ``wanted`` names."""
    return all(str(getattr(wanted, part)).upper() == str(getattr(got, part)).upper()
               for part in _DEVICE_PARTS if every or getattr(wanted, part) is not None)


def device_label(device: str) -> str:
    """A short name for pictures and messages: ``CPU:1`` for a device of this process, the
    full name for a task of a cluster."""
    spec = tf.DeviceSpec.from_string(device)
    short = f"{spec.device_type}:{spec.device_index}"
    return short if spec.job in (None, "localhost") else device


def resolve_devices(devices: Any, num_stages: int) -> list[str]:
    """The full name of each stage's device; ``devices=None``: the default device for all."""
    if devices is None:
        return [default_device()] * num_stages
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise GradSplitError(
            f"devices must be a list of device names, one per stage (e.g. ['/CPU:0', "
            f"'/CPU:1']); got {devices!r}."
        )
    names = [getattr(d, "name", d) for d in devices]  # tf.config.LogicalDevice works too
    if len(names) < num_stages:
        raise GradSplitError(
            f"the split has {num_stages} stages but only {len(names)} devices were given "
            f"({names}); give one device per stage (a name may repeat), or devices=None to "
            f"run every stage on the default device."
        )
    return [resolve_device(n) for n in names[:num_stages]]


def is_grid(devices: Any) -> bool:
    """Whether ``devices`` is a grid: a list whose entries are lists (one per stage, a
    device per replica), not names.

    >>> is_grid([["/CPU:0", "/CPU:2"], ["/CPU:1", "/CPU:3"]]), is_grid(["/CPU:0", "/CPU:1"])
    (True, False)
    """
    return (isinstance(devices, Sequence) and not isinstance(devices, (str, bytes))
            and any(isinstance(d, Sequence) and not isinstance(d, (str, bytes))
                    for d in devices))


def resolve_grid(devices: Sequence[Any], num_stages: int) -> list[list[str]]:
    """The full names of a grid, one list per stage (``R`` replicas each; extra lists are
    ignored). Refuses a grid whose lists differ in length or are empty, a list where a
    name is expected, fewer lists than stages, and a device named twice in one stage's
    list (its replicas all-reduce with TensorFlow's collective ops, one device per
    member)."""
    if not all(isinstance(d, Sequence) and not isinstance(d, (str, bytes)) for d in devices):
        raise GradSplitError(
            f"devices mixes device names and lists: {list(devices)!r}. Give one device "
            "name per stage (a pipeline), or one list of device names per stage, one per "
            "replica (a grid: data parallelism times pipeline parallelism).")
    lengths = [len(d) for d in devices]
    if len(set(lengths)) > 1 or not lengths[0]:
        raise GradSplitError(
            f"the grid of devices is ragged: its stage lists hold {lengths} devices; give "
            "every stage the same number R >= 1 of devices, one per replica (e.g. "
            "[['/CPU:0', '/CPU:2'], ['/CPU:1', '/CPU:3']]: 2 stages x 2 replicas).")
    if len(devices) < num_stages:
        raise GradSplitError(
            f"the split has {num_stages} stages but the grid of devices has only "
            f"{len(devices)} lists; give one list of devices (one per replica) per stage.")
    grid = [[resolve_device(getattr(n, "name", n)) for n in row]
            for row in list(devices)[:num_stages]]
    for k, row in enumerate(grid):
        twice = sorted({d for d in row if row.count(d) > 1})
        if twice:
            raise GradSplitError(
                f"device {twice[0]} is named twice in stage {k}'s list of the grid; the "
                "replicas of a stage sum their gradients with TensorFlow's collective "
                "all-reduce, which needs one device per replica. Give each stage R "
                "different devices (a device may serve different stages).")
    return grid


def default_device() -> str:
    """The device an op lands on in a thread with no device scope (the device threads see:
    the caller's ``with tf.device`` does not reach them)."""
    placed: list[str] = []
    thread = threading.Thread(target=lambda: placed.append(tf.zeros([]).device))
    thread.start()
    thread.join()
    return placed[0]


def resolve_device(name: Any) -> str:
    """The full name of the device ``name`` places ops on; refuses a device that TensorFlow
    would silently replace by another (soft placement)."""
    available = [d.name for d in tf.config.list_logical_devices()]
    try:
        wanted = tf.DeviceSpec.from_string(name)
        with tf.device(name):
            placed = tf.zeros([]).device
    except (TypeError, ValueError) as exc:
        raise GradSplitError(f"device {name!r} is not a device name: {exc}") from None
    if not _parts_agree(wanted, tf.DeviceSpec.from_string(placed), every=False):
        raise GradSplitError(
            f"device {name!r} does not exist here (TensorFlow would run on {placed} "
            f"instead); devices: {', '.join(available)}. More CPU devices come from "
            f"tf.config.set_logical_device_configuration before TensorFlow starts."
        )
    return placed


# -- replicas and stage callables ---------------------------------------------------------------

# Replicas and stage copies per split, so pipelines over one split share their XLA programs.
_REPLICA_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Functions and replicas ever placed on a task of a cluster, kept for the life of the process.
# When a tf.function is garbage-collected, eager TensorFlow asks every task of the cluster it
# is connected to *now* to forget it; after a reconnect to a restarted cluster, whose tasks
# never had it, that request fails ("Tried to remove non-existent function") and the failure
# surfaces in the next remote call, a step of an unrelated pipeline. Keeping them avoids that.
_KEEP_ALIVE: list = []


def keep_alive(*objects: Any) -> None:
    """Keep ``objects`` (functions, variables placed on a task of a cluster) for the life of
    the process; see ``_KEEP_ALIVE``."""
    _KEEP_ALIVE.extend(objects)


def _cache(split: Split) -> dict:
    return _REPLICA_CACHE.setdefault(split, {"replicas": {}, "stages": {}})


def plan_replicas(split: Split, devices: list[str], jit_compile: bool
                  ) -> tuple[dict[tuple[int, str], tf.Variable], list[tuple[int, str]]]:
    """``{(variable index, device): replica}`` for every variable a compiled stage reads on a
    device that does not hold it, and the keys of the written ones to copy back after a
    step."""
    if not jit_compile:  # a graph function reads across devices by itself
        return {}, []
    cache = _cache(split)
    written = set(split.program.written_variables())
    readers: dict[int, int] = {}
    for stage in split.stages:
        for idx in stage.variable_indices:
            readers[idx] = readers.get(idx, 0) + 1
    replicas, copied_back = {}, []
    for stage, device in zip(split.stages, devices):
        for idx in stage.variable_indices:
            v = split.variables[idx]
            if v.device == device:
                continue
            if idx in written and readers[idx] > 1:
                raise GradSplitError(
                    f"variable {v.name!r} is assigned by the program and read by "
                    f"{readers[idx]} stages; stage {stage.index} runs on {device} but the "
                    f"variable lives on {v.device}, and XLA cannot read across devices. "
                    f"Create it under `with tf.device({device!r})`, or pass jit_compile=False."
                )
            key = (idx, device)
            cached = (idx, device, _incarnation(device))
            if cached not in cache["replicas"]:
                with tf.init_scope(), tf.device(device):
                    cache["replicas"][cached] = tf.Variable(
                        v.read_value(), trainable=v.trainable,
                        name=f"{v.name.split(':')[0]}_on_stage{stage.index}")
                    if is_remote(device):
                        _KEEP_ALIVE.append(cache["replicas"][cached])
            replicas[key] = cache["replicas"][cached]
            if idx in written:
                copied_back.append(key)
    return replicas, copied_back


def stage_runner(split: Split, stage: Any, device: str,
                 replicas: dict[tuple[int, str], tf.Variable], jit_compile: bool,
                 remat: bool = False) -> StageRunner:
    """``stage`` bound to ``device``: it reads the replicas on ``device`` (from
    ``plan_replicas``) instead of the variables they stand for. ``remat``: its residuals
    are its inputs, and its backward runs the forward again (``Stage.programs``)."""
    mine = {idx: r for (idx, d), r in replicas.items() if d == device
            and idx in stage.variable_indices}
    variables = [mine.get(idx, split.variables[idx]) for idx in stage.variable_indices] \
        if mine else None
    backward_input = backward_weight = None
    if jit_compile and is_remote(device):
        # TensorFlow runs an XLA function on another process's device only from inside a
        # plain function (``_remote_callable``): every program here is called that way.
        wrappers = _cache(split)
        key = ("remote", stage.index, device, _incarnation(device),
               None if variables is None else tuple(map(id, variables)), bool(remat))
        if key not in wrappers["stages"]:
            programs = stage.programs(jit_compile, variables, remat, nested=True)
            if remat:
                made = programs
            else:
                forward, backward = stage.compiled(jit_compile, variables)
                made = StagePrograms(*_remote_callable(stage, forward, backward),
                                     programs.backward_input, programs.backward_weight)
            wrappers["stages"][key] = made
            _KEEP_ALIVE.append(made)
        forward, backward, backward_input, backward_weight = wrappers["stages"][key]
    else:
        programs = stage.programs(jit_compile, variables, remat)
        forward, backward = programs.forward, programs.backward
        backward_input, backward_weight = programs.backward_input, programs.backward_weight
    return StageRunner(
        backward_input=backward_input, backward_weight=backward_weight,
        index=stage.index, device=device, forward=forward, backward=backward,
        inputs=tuple(stage.inputs), outputs=tuple(stage.outputs),
        output_dtypes=tuple(s.dtype for s in stage.output_specs),
        variable_indices=tuple(stage.variable_indices),
        replicas=tuple(mine.items()),
    )


def _incarnation(device: str) -> Any:
    """What a replica on ``device`` is only valid for: the cluster this process is connected
    to (a restarted cluster has the same device names, but none of the old variables)."""
    if not is_remote(device):
        return None
    server_def = connected_server_def()
    return None if server_def is None else server_def.SerializeToString()


def _remote_callable(stage: Any, forward: Any, backward: Any) -> tuple[Any, Any]:
    """Plain functions that call the XLA ones, for a device of another process.

    TensorFlow 2.21 cannot run a ``jit_compile=True`` function as the top-level call on a
    remote task: eager raises ``InternalError: KernelAndDeviceOp does not support
    EagerFunctionParams``. Called from inside a plain function, the same XLA function runs
    on the task as a compiled cluster (``_XlaMustCompile``), as on a local device.
    """
    outer_forward = tf.function(forwarding(forward), input_signature=stage.input_specs,
                                autograph=False)
    outer_backward = tf.function(
        forwarding(backward),
        input_signature=[list(stage.residual_specs), list(stage.output_specs)],
        autograph=False)
    return outer_forward, outer_backward
