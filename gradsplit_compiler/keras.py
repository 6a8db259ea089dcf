"""Keras models trained by the pipeline: ``PipelineModel``.

``PipelineModel(model, cuts=[layer names], microbatches=M, schedule=..., devices=...)`` is a
``keras.Model`` whose ``compile``, ``fit``, ``evaluate``, ``predict`` and callbacks work as
for ``model``, with every training step run by a ``gsc.pipeline`` that owns the training
state: each stage's device holds its layers' variables and an optimizer like the compiled one
(see ``gsc.pipeline(..., optimizer=)``)::

    pm = PipelineModel(model, cuts=["block1", "block2", "block3"], microbatches=8,
                       devices=["/GPU:0", "/GPU:1", "/GPU:2", "/GPU:3"])
    pm.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    pm.fit(x, y, batch_size=64, epochs=3, validation_data=(xv, yv))
    pm.save("trained.keras")   # the original model, loadable without this library

How a step runs. ``fit`` calls ``train_step`` eagerly (a pipeline step drives one thread per
device and cannot be traced into ``fit``'s ``tf.function``; each stage is compiled already).
The loss the pipeline differentiates is ``model(x, training=True)`` followed by the compiled
loss (``compute_loss``: regularisation losses included), cut at the given layers; the
predictions come back from the last stage for the compiled metrics. A batch that the
micro-batch count does not divide (the last one of an epoch) runs with the largest count
that divides it.

Evaluating and predicting. ``evaluate`` and ``predict`` run forward-only pipelines
(``Pipeline.forward``) of ``model(x, training=False)`` (and the compiled loss, for
``evaluate``), cut at the same layers and placed on the same devices; once ``fit`` has built
the training state their stages read the stage-resident weights (``shares_state_with``).

Where the weights are. The stage-resident copies are the truth during ``fit``; the Keras
model's own variables (and the compiled optimizer's) are brought up to date at the end of
every epoch (before the other callbacks run) and whenever Keras or the user reads them
through the model: ``get_weights``, ``save_weights`` (``ModelCheckpoint``,
``BackupAndRestore``), ``save``; and ``set_weights`` / ``load_weights`` send new values to
the stages. A learning rate changed on the compiled optimizer (``LearningRateScheduler``) is
sent to every stage's optimizer before the next step.

Mixed precision. Under a ``mixed_float16`` policy ``compile`` wraps the optimizer in Keras'
``LossScaleOptimizer``, as for any model; the pipeline then seeds every stage's backward with
the loss scale, skips a step whose gradients are not finite on every stage (halving the
scale) and doubles the scale after its growth steps, as Keras does.

Limits. Batch-normalisation statistics move once per micro-batch (as the pipeline does); a
loss must reduce by a per-example mean (Keras' default ``"sum_over_batch_size"``) or sum;
``steps_per_execution`` runs that many eager steps per call.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from gradsplit_compiler._tf_internal import sublayers
from gradsplit_compiler.errors import GradSplitError, close_names
from gradsplit_compiler.run.devices import is_grid
from gradsplit_compiler.run.training import plain_variable

__all__ = ["PipelineModel", "PipelineSummaries"]


class PipelineModel(keras.Model):
    """``model`` trained by a pipeline; see the module docstring.

    Parameters
    ----------
    model : keras.Model
        A built Keras model (Sequential, functional, or subclassed and called once).
    cuts : list of str, optional
        Names of the model's layers to cut after, in data-flow order (``[]``: one stage,
        the whole model, which micro-batches still divide: gradient accumulation).
    num_stages : int, optional
        Instead of ``cuts``: ``gsc.auto_split`` chooses them (``1``: one stage).
    memory_limit : float, optional
        With ``num_stages``: the bytes each stage may hold (``auto_split``'s
        ``memory_limit``, at the micro-batch size of the first batch ``fit`` trains on, with
        ``microbatches`` in flight as 1F1B keeps them). The training pipeline
        rematerialises the stages the plan chose (``split.plan.remat``).
    microbatches, schedule, devices, jit_compile, timeout, one_program, on_nonfinite
        As for ``gsc.pipeline`` (with every stage on one device, a training step is one
        XLA program unless ``one_program=False``).
    """

    def __init__(self, model: Any, cuts: Sequence[str] | None = None,
                 num_stages: int | None = None, microbatches: int = 1,
                 schedule: str = "1f1b", devices: Sequence[str] | None = None, *,
                 jit_compile: bool = True, timeout: float | None = None,
                 one_program: bool | None = None, on_nonfinite: str = "raise",
                 name: str | None = None,
                 memory_limit: float | None = None):
        if not isinstance(model, keras.Model):
            raise GradSplitError(
                f"PipelineModel wraps a keras.Model; got {type(model).__name__}.")
        if not model.built:
            raise GradSplitError(
                f"model {model.name!r} is not built, so its layers have no variables to place "
                "on stages yet; build it first (give it a keras.Input, or call it once on a "
                "batch).")
        if (cuts is None) == (num_stages is None):
            raise GradSplitError(
                "give PipelineModel either cuts=[layer names] or num_stages=K (auto_split "
                "chooses the cuts), not both or neither.")
        if memory_limit is not None and num_stages is None:
            raise GradSplitError(
                "memory_limit guides auto_split's choice of cuts: give it with num_stages=K, "
                "not with cuts=[layer names].")
        if num_stages == 1 and not isinstance(num_stages, bool):
            cuts, num_stages = [], None  # one stage: the whole model on one device
        if cuts is not None:
            if isinstance(cuts, str) or not isinstance(cuts, Sequence):
                raise GradSplitError(
                    f"cuts must be a list of layer names (empty: one stage); got {cuts!r}.")
            known = _layer_names(model)
            unknown = [c for c in cuts if c not in known]
            if unknown:
                close = close_names(str(unknown[0]), sorted(known))
                hint = f" (close: {', '.join(close)})" if close else ""
                raise GradSplitError(
                    f"model {model.name!r} has no layer {unknown[0]!r}{hint}; cuts are names "
                    "of the model's layers (model.summary() lists them).")
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or \
                microbatches < 1:
            raise GradSplitError(
                f"microbatches must be a positive integer; got {microbatches!r}.")
        if is_grid(devices):
            raise GradSplitError(
                "PipelineModel takes one device per stage; a grid of devices (one list per "
                "stage, a device per replica) does not run through Keras' fit yet. Train "
                "the grid with gsc.pipeline(split, M, devices=grid, optimizer=...) and its "
                "train_step.")
        super().__init__(name=name or f"pipeline_{model.name}")
        self.model = model
        self.cuts = None if cuts is None else list(cuts)
        self.num_stages = num_stages
        self.memory_limit = memory_limit
        self.microbatches = microbatches
        self.schedule = schedule
        self.stage_devices = None if devices is None else list(devices)
        self.pipeline_jit_compile = jit_compile
        self.timeout = timeout
        self.one_program = one_program
        self.on_nonfinite = on_nonfinite
        self._run = _RunState()
        self.built = True

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    # -- compile ------------------------------------------------------------------------------

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As ``keras.Model.compile``; ``run_eagerly`` and ``jit_compile`` are ignored (steps
        run eagerly through the pipeline, each stage compiled by XLA), and the loss must
        reduce by a mean or a sum over the examples."""
        kwargs.pop("run_eagerly", None)
        kwargs.pop("jit_compile", None)
        self.loss_reduction = _loss_reduction(loss)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, run_eagerly=True,
                        jit_compile=False, **kwargs)
        self._run = _RunState()
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer  # its slots are the inner optimizer's
        make_slot = optimizer.add_variable_from_reference

        def recording(reference, name=None, initializer="zeros"):
            slot = make_slot(reference, name=name, initializer=initializer)
            self._run.slot_of[(id(plain_variable(reference)), name or "var")] = slot
            return slot

        # Which compiled-optimizer slot belongs to which variable, to copy the stages' slots
        # into it (checkpoints written through the model carry the optimizer's state).
        optimizer.add_variable_from_reference = recording
        learning_rate = optimizer.get_config().get("learning_rate")  # the inner one's
        self._run.lr = None if isinstance(learning_rate, dict) else float(learning_rate)

    # -- training -----------------------------------------------------------------------------

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        self.train_function = self._eager_loop(self.train_step)
        return self.train_function

    def _eager_loop(self, step):
        """``steps_per_execution`` calls of ``step`` in plain Python (a pipeline step runs
        one thread per device and cannot be traced into Keras' ``tf.function``)."""

        def function(iterator):
            logs = None
            for _ in range(self.steps_per_execution):
                try:
                    data = next(iterator)
                except StopIteration:
                    if logs is None:
                        raise
                    break
                logs = step(data)
            return logs

        return function

    def fit(self, *args, **kwargs):
        """As ``keras.Model.fit``. Before the other callbacks see the end of an epoch, the
        Keras variables are brought up to date with the stages (so ``TensorBoard``'s
        histograms and any callback reading the weights see the trained values); with a
        ``TensorBoard`` callback, the pipeline's own figures of the epoch's last step go to
        ``<log_dir>/pipeline`` (see ``PipelineSummaries``)."""
        position = 5  # fit(x, y, batch_size, epochs, verbose, callbacks, ...)
        args = list(args)
        given = args[position] if len(args) > position else kwargs.get("callbacks")
        callbacks = list(given or [])
        boards = [c for c in callbacks if isinstance(c, keras.callbacks.TensorBoard)]
        ours = [PipelineSummaries(os.path.join(b.log_dir, "pipeline")) for b in boards
                if not any(isinstance(c, PipelineSummaries) for c in callbacks)]
        callbacks = [_SyncAtEpochEnd(), *callbacks, *ours]
        if len(args) > position:
            args[position] = callbacks
        else:
            kwargs["callbacks"] = callbacks
        self._run.checked_batch = False
        return super().fit(*args, **kwargs)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        flat, structure = _flatten(x, y, sample_weight)
        batch = int(flat[0].shape[0])
        if not self._run.checked_batch:  # the first batch of fit gives its batch size
            self._run.checked_batch = True
            if batch % self.microbatches:
                m = self.microbatches
                raise GradSplitError(
                    f"fit's batches have {batch} examples, which microbatches={m} does not "
                    f"divide into equal micro-batches; use a batch_size that is a multiple "
                    f"of {m} (e.g. {max(m, batch - batch % m)} or {batch + m - batch % m}). "
                    "Only the last batch of an epoch may be smaller: it runs with the "
                    "largest micro-batch count that divides it.")
        pipe = self._pipeline_for(flat, structure, batch)
        self._send_learning_rate()
        loss, y_pred = pipe.train_step(*flat)
        self._run.stale = True
        self._run.last = pipe
        return self._update_metrics("train", loss, batch, x, y, y_pred, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        flat, structure = _flatten(x, y, sample_weight)
        pipe = self._forward_pipeline_for("test", flat, structure)
        loss, y_pred = pipe.forward(*flat)
        return self._update_metrics("test", loss, int(flat[0].shape[0]), x, y, y_pred,
                                    sample_weight)

    def _update_metrics(self, kind: str, loss, batch: int, x, y, y_pred, sample_weight):
        """The loss tracker (weighted by the batch size) and the compiled metrics updated,
        and every metric's result, as one traced function per ``kind`` (eagerly, each
        update is tens of small operations a step)."""
        function = self._run.metrics.get(kind)
        if function is None:
            def update(loss, batch, x, y, y_pred, sample_weight):
                for metric in self.metrics:
                    if metric.name == "loss":
                        metric.update_state(loss, sample_weight=batch)
                return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

            function = self._run.metrics[kind] = tf.function(update, reduce_retracing=True)
        return function(loss, tf.constant(batch, loss.dtype), x, y, y_pred, sample_weight)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        flat, structure = _flatten(x, None, None)
        _, y_pred = self._forward_pipeline_for("predict", flat, structure).forward(*flat)
        return y_pred

    def make_test_function(self, force=False):
        if self.test_function is not None and not force:
            return self.test_function
        self.test_function = self._eager_loop(self.test_step)
        return self.test_function

    def _forward_pipeline_for(self, kind: str, flat, structure):
        """The forward-only pipeline of ``model(x, training=False)`` (with the compiled
        loss for ``"test"``) for data like ``flat``: its stages read the training
        pipeline's stage-resident copies once ``fit`` has built it, the model's own
        variables before that."""
        batch = int(flat[0].shape[0])
        specs = tuple(tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in flat)
        key = (kind, structure[:3], specs, id(self._run.state))
        if key not in self._run.forward:
            self._run.forward[key] = self._build_forward(kind, structure, list(specs))
        return _with_count(self._run.forward[key], self.microbatches, batch)

    def _split(self, structure, specs, kind: str, batch: int | None = None):
        """The split of ``model(x, training=kind == "train")`` followed by the compiled loss
        (a constant stands in for it for ``"predict"``), returning ``(loss, y_pred)``, cut
        at ``cuts`` or by ``auto_split``."""
        from gradsplit_compiler.core.split import split as make_split
        from gradsplit_compiler.plan.autosplit import auto_split

        model, training = self.model, kind == "train"

        def fn(*flat):
            x, y, sample_weight = _unflatten(structure, flat)
            y_pred = model(x, training=training)
            if kind == "predict":
                return tf.zeros((), tf.nest.flatten(y_pred)[0].dtype), y_pred
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                     training=training)
            return loss, y_pred

        if self.cuts is not None:
            return make_split(fn, specs, cuts=self.cuts)
        if self.memory_limit is not None and kind == "train" and batch is not None:
            return auto_split(fn, specs, self.num_stages, memory_limit=self.memory_limit,
                              batch_size=max(batch // self.microbatches, 1),
                              microbatches=self.microbatches)
        return auto_split(fn, specs, self.num_stages)

    def _build_forward(self, kind: str, structure, specs):
        from gradsplit_compiler.run.pipeline import pipeline

        split = self._split(structure, specs, kind)
        options = {"loss_reduction": "sum" if kind == "predict" else self.loss_reduction,
                   "jit_compile": self.pipeline_jit_compile, "timeout": self.timeout}
        trained = next(iter(self._run.pipelines.values()), None)
        if trained is not None:
            try:
                return pipeline(split, self.microbatches, "gpipe", self.stage_devices,
                                shares_state_with=trained, **options)
            except GradSplitError:
                pass  # auto_split cut it elsewhere: the model's variables, brought up to date
        self._sync_to_model()
        return pipeline(split, self.microbatches, "gpipe", self.stage_devices, **options)

    def _pipeline_for(self, flat, structure, batch: int):
        specs = tuple(tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in flat)
        key = (structure[:3], specs)
        if key not in self._run.pipelines:
            self._run.pipelines[key] = self._build(structure, list(specs), batch)
        return _with_count(self._run.pipelines[key], self.microbatches, batch)

    def _build(self, structure, specs, batch: int | None = None):
        from gradsplit_compiler.run.pipeline import pipeline

        split = self._split(structure, specs, "train", batch)
        if self._run.state is None:
            self._sync_to_model()
            optimizer = type(self.optimizer).from_config(self.optimizer.get_config())
            pipe = pipeline(split, self.microbatches, self.schedule, self.stage_devices,
                                loss_reduction=self.loss_reduction, optimizer=optimizer,
                                jit_compile=self.pipeline_jit_compile, timeout=self.timeout,
                                one_program=self.one_program,
                                on_nonfinite=self.on_nonfinite)
            self._run.state = pipe.training_state
            if self.optimizer.built:  # state restored into the model (BackupAndRestore)
                self._sync_from_model()
            return pipe
        raise GradSplitError(
            "fit was given data of another structure or dtype than before (e.g. with and "
            "without sample weights); PipelineModel keeps one pipeline per model. Give "
            "every fit/train_on_batch call the same kind of data.")

    def _send_learning_rate(self) -> None:
        if self._run.lr is None or self._run.state is None:
            return
        now = float(self.optimizer.learning_rate)
        if now != self._run.state.learning_rate:
            self._run.state.set_learning_rate(now)

    # -- keeping the Keras variables and the stages in step -----------------------------------

    def _sync_to_model(self) -> None:
        """Bring the Keras variables and the compiled optimizer up to date with the stages."""
        if self._run.state is None or not self._run.stale:
            return
        self._run.state.write_back()
        optimizer = self.optimizer
        if not optimizer.built:
            optimizer.build(self.trainable_variables)
        for (idx, name), value in self._run.state.slot_values().items():
            slot = self._run.slot_of.get((id(self._run.state.split.variables[idx]), name))
            if slot is not None:
                slot.assign(value)
        optimizer.iterations.assign(self._run.state.iterations)
        if self._run.state.loss_scale is not None:
            for name, variable in self._run.state.loss_scale.variables().items():
                getattr(optimizer, name).assign(tf.cast(variable, getattr(optimizer,
                                                                          name).dtype))
        self._run.stale = False

    def _sync_from_model(self) -> None:
        """Send the Keras variables and the compiled optimizer's state to the stages."""
        if self._run.state is None:
            return
        self._run.state.read_variables()
        if self.optimizer.built:
            index = {id(v): i for i, v in enumerate(self._run.state.split.variables)}
            values = {(index[ref], name): slot
                      for (ref, name), slot in self._run.slot_of.items() if ref in index}
            self._run.state.assign_slots(values, int(self.optimizer.iterations.numpy()))
            if self._run.state.loss_scale is not None:
                for name, variable in self._run.state.loss_scale.variables().items():
                    variable.assign(tf.cast(getattr(self.optimizer, name), variable.dtype))
        self._run.stale = False

    def get_weights(self):
        self._sync_to_model()
        return super().get_weights()

    def set_weights(self, weights):
        super().set_weights(weights)
        self._sync_from_model()

    def save_weights(self, filepath, *args, **kwargs):
        self._sync_to_model()
        return super().save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        result = super().load_weights(filepath, *args, **kwargs)
        self._sync_from_model()
        return result

    def save(self, filepath, *args, **kwargs):
        """Save the original model with the trained weights (a ``.keras`` file that
        ``keras.models.load_model`` reads without this library)."""
        self._sync_to_model()
        return self.model.save(filepath, *args, **kwargs)

    def summary(self, *args, **kwargs):
        """Keras' summary of the wrapped model, then one line per stage: its device, the
        layers whose variables it holds, its parameters, and the bytes entering it and
        kept for its backward per batch (once ``fit`` has built the pipeline)."""
        print_fn = kwargs.get("print_fn") or print
        self.model.summary(*args, **kwargs)
        if not self._run.pipelines:
            print_fn("Stages: built by the first training step (cut at "
                     f"{self.cuts or f'{self.num_stages} stages by auto_split'}).")
            return
        pipe = next(iter(self._run.pipelines.values()))
        split = pipe.split
        rows = split.summary()
        print_fn(f"Pipeline: {len(split.stages)} stages, {pipe.microbatches} micro-batches, "
                 f"schedule {self.schedule!r}; bytes per example")
        print_fn(f"{'stage':>5}  {'device':<34} {'params':>10} {'in B':>10} "
                 f"{'kept B':>10}  layers")
        for stage, row, device in zip(split.stages, rows, pipe.devices):
            held = [split.variables[i] for i in stage.variable_indices]
            params = sum(int(v.shape.num_elements()) for v in held if v.trainable)
            layers = list(dict.fromkeys(v.name.rsplit("/", 1)[0] for v in held))
            print_fn(f"{stage.index:>5}  {device:<34} {params:>10,} "
                     f"{row['boundary_bytes']:>10,} {row['residual_bytes']:>10,}  "
                     f"{', '.join(layers) or '-'}")

    @property
    def pipelines(self) -> list:
        """The pipelines built so far (one per kind of data ``fit`` was given)."""
        return list(self._run.pipelines.values())

    @property
    def forward_pipelines(self) -> list:
        """The forward-only pipelines of ``evaluate`` and ``predict`` built so far."""
        return list(self._run.forward.values())

    @property
    def last_pipeline(self) -> Any:
        """The pipeline that ran the last training step (``None`` before the first); its
        ``timeline()``, ``idle_fraction()`` and ``bytes_moved()`` describe that step."""
        return self._run.last


class PipelineSummaries(keras.callbacks.Callback):
    """Write the pipeline's figures of each epoch's last step as TensorBoard summaries into
    ``log_dir``: scalars ``pipeline/idle_fraction`` (measured) and
    ``pipeline/ideal_idle_fraction``, ``pipeline/bytes_moved/<kind>`` per kind of traffic,
    ``pipeline/step_seconds`` (first action's start to last action's end), and the timeline
    as the image ``pipeline/timeline`` (when matplotlib is installed). ``PipelineModel.fit``
    adds one by itself beside every ``keras.callbacks.TensorBoard`` (into its
    ``log_dir/pipeline``); TensorBoard itself must be installed, as for the Keras callback.
    """

    def __init__(self, log_dir: str | os.PathLike, every: int = 1):
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self.every = every
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        pipe = getattr(self.model, "last_pipeline", None)
        if pipe is None or epoch % self.every:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        events = pipe.timeline()
        measured, ideal = pipe.idle_fraction()
        with self._writer.as_default(step=epoch):
            tf.summary.scalar("pipeline/idle_fraction", measured)
            tf.summary.scalar("pipeline/ideal_idle_fraction", ideal)
            if events:
                tf.summary.scalar("pipeline/step_seconds",
                                  max(e.end for e in events) - min(e.start for e in events))
            for kind, count in pipe.bytes_moved().items():
                tf.summary.scalar(f"pipeline/bytes_moved/{kind}", count)
            image = _timeline_png(pipe)
            if image is not None:
                tf.summary.image("pipeline/timeline", image[None], description=(
                    "Each device's actions in the epoch's last step: one colour per stage, "
                    "backwards hatched, the micro-batch in each box."))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _SyncAtEpochEnd(keras.callbacks.Callback):
    """First of ``fit``'s callbacks: the Keras variables follow the stages at epoch ends."""

    def on_epoch_end(self, epoch, logs=None):
        self.model._sync_to_model()  # noqa: SLF001 - our own model's


def _timeline_png(pipe) -> tf.Tensor | None:
    """The last step's timeline drawn by ``plot_timeline``, decoded (``None`` without
    matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = pipe.plot_timeline(os.path.join(folder, "timeline.png"))
        return tf.io.decode_png(tf.io.read_file(path), channels=4)


# -- helpers --------------------------------------------------------------------------------------


class _RunState:
    """What a PipelineModel keeps of its pipelines, in a plain object so that Keras does not
    track the variables it refers to as the model's own."""

    def __init__(self):
        self.pipelines: dict = {}
        self.state = None       # the one TrainingState all pipelines share
        self.stale = False      # the Keras variables lag behind the stages
        self.slot_of: dict = {}  # (id of tf.Variable, slot name) -> compiled optimizer slot
        self.lr: float | None = None
        self.last = None         # the pipeline of the last training step
        self.forward: dict = {}  # forward-only pipelines of evaluate and predict
        self.checked_batch = True  # fit sets it to False: its first batch is checked
        self.metrics: dict = {}  # traced metric updates of training and evaluation


def _with_count(pipe, microbatches: int, batch: int):
    """``pipe`` with the largest micro-batch count up to ``microbatches`` that divides
    ``batch`` (the last batch of an epoch may be smaller)."""
    m = max(d for d in range(1, min(microbatches, batch) + 1) if batch % d == 0)
    return pipe if m == pipe.microbatches else pipe.with_microbatches(m)


def _flatten(x, y, sample_weight):
    """The tensors of ``(x, y, sample_weight)`` (``None`` parts left out) and what
    ``_unflatten`` needs to put them back: the nest and where the tensors go in it."""
    data = (x, y, sample_weight)
    leaves = tf.nest.flatten(data)
    present = tuple(i for i, t in enumerate(leaves) if t is not None)
    flat = [tf.convert_to_tensor(leaves[i]) for i in present]
    skeleton = tf.nest.map_structure(lambda t: None if t is None else 0, data)
    return flat, (_freeze(skeleton), len(leaves), present, skeleton)


def _unflatten(structure, flat):
    _, size, present, skeleton = structure
    leaves = [None] * size
    for i, t in zip(present, flat):
        leaves[i] = t
    return tf.nest.pack_sequence_as(skeleton, leaves)


def _freeze(structure):
    """A hashable stand-in for a nest of zeros and Nones (dicts by sorted keys)."""
    if isinstance(structure, dict):
        return ("dict", tuple((k, _freeze(structure[k])) for k in sorted(structure)))
    if isinstance(structure, (list, tuple)):
        return (type(structure).__name__, tuple(_freeze(s) for s in structure))
    return structure


def _loss_reduction(loss: Any) -> str:
    """``"mean"`` or ``"sum"``: how the compiled loss reduces over examples."""
    reductions = set()
    for item in tf.nest.flatten(loss):
        if item is None:
            continue
        if isinstance(item, str):
            item = keras.losses.get(item)
        reduction = getattr(item, "reduction", "sum_over_batch_size")
        reductions.add(reduction)
    mapping = {"sum_over_batch_size": "mean", "sum": "sum"}
    unknown = sorted(r for r in map(str, reductions) if r not in mapping)
    if unknown or len({mapping[r] for r in reductions}) > 1:
        raise GradSplitError(
            f"the loss reduces with {', '.join(repr(r) for r in sorted(map(str, reductions)))}; "
            "a pipeline adds up micro-batches, which needs a per-example mean "
            "('sum_over_batch_size', Keras' default) or sum ('sum') over the batch, the same "
            "for every output.")
    if not reductions:
        raise GradSplitError("compile needs a loss (e.g. loss='mse') to train a pipeline.")
    return mapping[reductions.pop()]



def _layer_names(model: Any) -> set[str]:
    """Every layer name inside ``model``, nested models included."""
    names, todo = set(), list(sublayers(model))
    while todo:
        layer = todo.pop()
        names.add(layer.name)
        todo.extend(sublayers(layer))
    return names
