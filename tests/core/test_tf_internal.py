"""Pins the private TensorFlow behaviour gradsplit_compiler relies on (_tf_internal.py)."""

import numpy as np
import tensorflow as tf

from gradsplit_compiler import _tf_internal


def _cond_graph_def():
    @tf.function
    def f(x):
        return tf.cond(tf.reduce_sum(x) > 0, lambda: x * 2.0, lambda: x - 1.0)

    return f.get_concrete_function(tf.TensorSpec([3])).graph.as_graph_def()


def test_fresh_function_names_rename_definitions_and_references_alike():
    gd = _cond_graph_def()
    renamed = _tf_internal.with_fresh_function_names(gd)
    old = {f.signature.name for f in gd.library.function}
    new = {f.signature.name for f in renamed.library.function}
    assert old and not old & new
    referenced = {
        v.func.name for nd in renamed.node for v in nd.attr.values() if v.HasField("func")
    }
    assert referenced and referenced <= new
    again = _tf_internal.with_fresh_function_names(renamed)
    assert not {f.signature.name for f in again.library.function} & new


def test_renamed_pieces_import_twice_into_one_function_and_run():
    gd = _cond_graph_def()

    @tf.function
    def twice(x):
        outs = []
        for _ in range(2):
            piece = _tf_internal.with_fresh_function_names(gd)
            (y,) = tf.graph_util.import_graph_def(
                piece, input_map={"x:0": x}, return_elements=["Identity:0"], name="p")
            _tf_internal.register_functions(piece.library)
            outs.append(y)
        return outs[0] + outs[1]

    assert twice(tf.constant([1.0, 2.0, 3.0])).numpy().tolist() == [4.0, 8.0, 12.0]


def test_registered_library_functions_leave_the_context_with_the_function_using_them():
    import gc

    from tensorflow.python.eager import context

    gd = _cond_graph_def()
    piece = _tf_internal.with_fresh_function_names(gd)
    names = {f.signature.name for f in piece.library.function}

    def body(x):
        (y,) = tf.graph_util.import_graph_def(
            piece, input_map={"x:0": x}, return_elements=["Identity:0"], name="p")
        _tf_internal.register_functions(piece.library)
        return y

    f = tf.function(body)
    assert f(tf.constant([1.0, -2.0, 3.0])).numpy().tolist() == [2.0, -4.0, 6.0]
    assert names <= set(context.context().list_function_names())
    del f
    gc.collect()
    assert not names & set(context.context().list_function_names())


def test_function_body_graph_def_maps_list_outputs_to_flat_names():
    @tf.function
    def f(x):
        a, b = tf.split(x, 2)
        return b

    fdef = f.get_concrete_function(tf.TensorSpec([4])).function_def
    body, flat = _tf_internal.function_body_graph_def(fdef)
    ret = fdef.ret[fdef.signature.output_arg[0].name]
    assert flat[ret].endswith(":0") or flat[ret].endswith(":1")
    assert any(nd.op == "Placeholder" for nd in body.node)


def test_flat_caller_runs_the_signature_function_on_flat_tensors():
    v = tf.Variable([1.0, 2.0])

    @tf.function(input_signature=[[tf.TensorSpec([None, 2])], tf.TensorSpec([2])],
                 autograph=False)
    def f(xs, y):
        return {"sum": xs[0] * v + y}, [tf.reduce_sum(xs[0])]

    call = _tf_internal.flat_caller(f)
    x, y = tf.constant([[1.0, 1.0], [2.0, 3.0]]), tf.constant([0.5, -0.5])
    got = call(x, y)
    want = f([x], y)
    assert tf.nest.map_structure(lambda t: None, got) == \
        tf.nest.map_structure(lambda t: None, want)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
        assert (a.numpy() == b.numpy()).all()
    v.assign([3.0, 4.0])  # captured variables are read at call time
    assert call(x, y)[0]["sum"].numpy()[0].tolist() == [3.5, 3.5]


def test_flat_caller_keeps_none_outputs_dict_order_and_is_recorded_under_a_tape():
    """The lean eager path packs the outputs as the function's own call does (``None``
    entries, a dict's values by key); under a ``tf.GradientTape`` the call is recorded, so
    gradients flow through it."""
    rng = np.random.default_rng(3)
    v = tf.Variable(rng.normal(size=3))

    @tf.function(input_signature=[tf.TensorSpec([3], tf.float64)], autograph=False)
    def f(x):
        return x * v, None, {"b": tf.reduce_sum(x), "a": [x + 1.0, x * x]}

    call = _tf_internal.flat_caller(f)
    x = tf.constant(rng.normal(size=3))
    got, want = call(x), f(x)
    assert got[1] is None and list(got[2]) == ["b", "a"]
    assert tf.nest.map_structure(lambda t: None, got) == \
        tf.nest.map_structure(lambda t: None, want)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
        assert a is b is None or (a.numpy() == b.numpy()).all()
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = call(x)[0]
    dx, dv = tape.gradient(y, [x, v])
    assert np.array_equal(dx.numpy(), v.numpy()) and np.array_equal(dv.numpy(), x.numpy())

    @tf.function(input_signature=[tf.TensorSpec([3], tf.float64)], autograph=False)
    def no_outputs(x):
        v.assign(x)
        return []

    assert _tf_internal.flat_caller(no_outputs)(x) == [] and np.array_equal(v.numpy(), x.numpy())


def test_flat_caller_is_seen_by_a_forward_accumulator():
    """Forward-mode autodiff (``tf.autodiff.ForwardAccumulator``) sees the call: the lean
    path (taken with no gradient tape) runs the same call op, whose JVP TensorFlow builds."""
    rng = np.random.default_rng(4)
    w = tf.constant(rng.normal(size=(3, 3)))

    @tf.function(input_signature=[tf.TensorSpec([3], tf.float64)], autograph=False)
    def f(x):
        return [tf.linalg.matvec(w, tf.sin(x))]

    call = _tf_internal.flat_caller(f)
    x, t = tf.constant(rng.normal(size=3)), tf.constant(rng.normal(size=3))
    with tf.autodiff.ForwardAccumulator(x, t) as acc:
        y = call(x)[0]
    jvp = acc.jvp(y)
    assert jvp is not None
    np.testing.assert_allclose(jvp.numpy(), w.numpy() @ (np.cos(x.numpy()) * t.numpy()),
                               rtol=1e-12)


def test_registered_gradient_finds_a_custom_gradient_by_its_op_type_name():
    @tf.custom_gradient
    def f(x):
        return x * 2.0, lambda dy: dy * 3.0

    graph = tf.function(f).get_concrete_function(tf.TensorSpec([2])).graph
    kinds = [op.get_attr("_gradient_op_type").decode() for op in graph.get_operations()
             if "_gradient_op_type" in op.node_def.attr]
    assert kinds and callable(_tf_internal.registered_gradient(kinds[0]))
    assert _tf_internal.registered_gradient("no such gradient") is None


def test_connected_server_def_is_none_until_connected_then_names_the_tasks():
    # Connecting changes the eager context of the whole process: do it in a process of its own.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import json, socket\n"
        "import tensorflow as tf\n"
        "from gradsplit_compiler import _tf_internal\n"
        "before = _tf_internal.connected_server_def()\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "spec = tf.train.ClusterSpec({'worker': [f'localhost:{port}']})\n"
        "server = tf.distribute.Server(spec, job_name='worker', task_index=0, start=True)\n"
        "tf.config.experimental_connect_to_cluster(spec)\n"
        "sd = _tf_internal.connected_server_def()\n"
        "print('RESULT ' + json.dumps({'before': before is None, 'port': port,\n"
        "      'jobs': {j.name: dict(j.tasks) for j in sd.cluster.job},\n"
        "      'serialized': len(sd.SerializeToString())}), flush=True)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["before"]
    assert result["jobs"]["worker"] == {"0": f"localhost:{result['port']}"}
    assert "localhost" in result["jobs"]  # the client's own job, added by connecting
    assert result["serialized"] > 0


def test_call_flat_runs_a_concrete_function_on_its_flat_arguments_and_given_captures():
    v = tf.Variable(2.0)

    @tf.function(autograph=False)
    def f(x):
        return x * v

    concrete = f.get_concrete_function(tf.TensorSpec([2]))
    x = tf.constant([1.0, 3.0])
    assert _tf_internal.call_flat(concrete, [x]).numpy().tolist() == [2.0, 6.0]
    other = tf.Variable(5.0)  # captures in their order: another handle stands in for v
    got = _tf_internal.call_flat(concrete, [x], [other.handle])
    assert got.numpy().tolist() == [5.0, 15.0]


def test_has_control_outputs_sees_control_dependencies_on_an_op():
    graph = tf.Graph()
    with graph.as_default():
        a = tf.constant(1.0, name="a")
        b = tf.constant(2.0, name="b")
        with tf.control_dependencies([a]):
            tf.identity(b, name="c")
    assert _tf_internal.has_control_outputs(a.op)
    assert not _tf_internal.has_control_outputs(b.op)


def test_shape_dims_is_the_static_shape_as_a_tuple():
    assert _tf_internal.shape_dims(tf.TensorShape([None, 3])) == (None, 3)
    assert _tf_internal.shape_dims(tf.TensorShape([])) == ()
    assert _tf_internal.shape_dims(tf.TensorShape(None)) is None
    assert _tf_internal.shape_dims([None, 3]) is None  # not a TensorShape


def test_connected_server_def_is_none_without_a_cluster():
    assert _tf_internal.connected_server_def() is None


def _keras_models():
    import keras

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1")],
                             name="inner")
    x = keras.Input((4,), name="x")
    y = keras.layers.Dense(2, name="d2")(inner(x))
    return inner, keras.Model(x, y, name="outer")


def test_sublayers_are_the_direct_sublayers_of_models_and_layers():
    inner, outer = _keras_models()
    # a Sequential tracks the InputLayer it made from keras.Input before its own layers
    assert [layer.name for layer in _tf_internal.sublayers(inner)][-1:] == ["d1"]
    assert [layer.name for layer in _tf_internal.sublayers(outer)] == ["x", "inner", "d2"]
    assert _tf_internal.sublayers(inner.layers[0]) == []
    assert _tf_internal.sublayers(object()) == []


def test_functional_of_models_and_their_nodes_by_depth():
    import keras

    inner, outer = _keras_models()
    assert _tf_internal.functional_of(outer) is outer
    assert _tf_internal.functional_of(inner) is not None  # a built Sequential wraps one
    assert _tf_internal.functional_of(keras.layers.Dense(2)) is None
    by_depth = _tf_internal.nodes_by_depth(outer)
    assert min(by_depth) == 0
    operations = [node.operation.name for depth in sorted(by_depth, reverse=True)
                  for node in by_depth[depth]]
    assert operations == ["x", "inner", "d2"]
    assert all(hasattr(node, "is_input") and hasattr(node, "input_tensors")
               and hasattr(node, "outputs") for nodes in by_depth.values() for node in nodes)


def test_input_layer_of_a_model_input_is_its_input_layer():
    _, outer = _keras_models()
    layer = _tf_internal.input_layer_of(outer.inputs[0])
    assert layer.name == "x" and type(layer).__name__ == "InputLayer"


def test_op_def_is_the_registered_definition_or_none():
    check = _tf_internal.op_def("CheckNumerics")
    assert [a.name for a in check.input_arg] == ["tensor"]
    assert {a.name for a in check.attr} == {"T", "message"}
    assert _tf_internal.op_def("NoSuchOpAnywhere") is None


def test_eager_function_names_grow_when_a_function_is_called():
    before = _tf_internal.eager_function_names()
    f = tf.function(lambda x: x * 3.0)
    f(tf.constant(1.0))
    assert _tf_internal.eager_function_names() - before


def test_a_variable_read_through_its_handle_is_watched_once_recorded():
    v = tf.Variable(2.0)

    def body(record):
        def f():
            if record:
                _tf_internal.record_variable_read(v)
            handle = _tf_internal.capture_in_current_graph(v.handle)
            return tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32) ** 2
        return tf.function(f, autograph=False)

    for record, expected in ((False, None), (True, 4.0)):
        with tf.GradientTape() as tape:
            value = body(record)()
        grad = tape.gradient(value, v)
        assert (grad is None) if expected is None else float(grad) == expected


def test_copy_handle_data_gives_a_resource_the_variables_dtype_and_shape():
    with tf.Graph().as_default():
        source = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[2, 3])
        bare = tf.compat.v1.placeholder(tf.resource)
        before = tf.raw_ops.ReadVariableOp(resource=bare, dtype=tf.float32).shape
        _tf_internal.copy_handle_data(source, bare)
        after = tf.raw_ops.ReadVariableOp(resource=bare, dtype=tf.float32).shape
    assert before.rank is None and after.as_list() == [2, 3]


def test_scratch_graph_captures_eager_tensors_and_differentiates_as_xla_does():
    """What the stage trace relies on: an eager handle becomes a capture of the graph, no
    control dependencies are added, and with ``xla`` a ``tf.cond`` keeps the intermediates
    its gradient reads as plain tensors (XLA's rule), without it as optionals (variants)."""
    v = tf.Variable([1.5, -2.0])

    def build():
        x = tf.compat.v1.placeholder(tf.float32, [2], name="x")
        handle = _tf_internal.capture_in_current_graph(v.handle)
        w = tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)
        y = tf.cond(x[0] > 0, lambda: tf.sin(x * w), lambda: tf.cos(x))
        grads = tf.gradients(y, [x, handle])
        assert all(g is not None for g in grads)
        forward_if, = [op for op in tf.compat.v1.get_default_graph().get_operations()
                       if op.type in ("If", "StatelessIf") and "gradients" not in op.name]
        return [t.dtype for t in forward_if.outputs]

    with _tf_internal.scratch_graph("plain", xla=False) as graph:
        assert tf.variant in build()
    (external, _), = graph.captures
    assert external is v.handle
    assert not any(op.control_inputs for op in graph.get_operations()
                   if op.type == "ReadVariableOp")
    with _tf_internal.scratch_graph("xla", xla=True):
        assert tf.variant not in build()


def test_skip_underived_inputs_tells_what_no_x_flows_into_and_keeps_the_gradient():
    """The ops that depend on ``x`` learn which inputs do not (a constant factor, what
    ``tf.stop_gradient`` stops, an integer shape); ``tf.gradients`` then builds fewer ops
    and gives what a tape gives."""
    import numpy as np

    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((4, 3))
    c0 = rng.standard_normal((1, 3))

    def f(x):
        c = tf.constant(c0)
        mean = tf.stop_gradient(tf.reduce_mean(x, axis=0, keepdims=True))
        return tf.reduce_sum(tf.math.squared_difference(x, mean) * c - x * tf.sin(c))

    def trace(skip: bool):
        with _tf_internal.scratch_graph("skip", xla=False) as graph:
            x = tf.compat.v1.placeholder(tf.float64, [4, 3], name="x")
            y = f(x)
            told = _tf_internal.skip_underived_inputs([x]) if skip else 0
            before = len(graph.get_operations())
            g, = tf.gradients(y, [x])
        return graph, g, told, len(graph.get_operations()) - before

    graph, g, told, built = trace(skip=True)
    ops = {op.name: op for op in graph.get_operations()}
    assert told >= 3
    squared, = [op for op in ops.values() if op.type == "SquaredDifference"]
    assert squared.skip_input_indices == (1,)  # the mean, behind tf.stop_gradient
    mul, = [op for op in ops.values() if op.type == "Mul" and op.inputs[0].op is squared]
    assert mul.skip_input_indices == (1,)  # the constant
    _, _, _, built_without = trace(skip=False)
    assert built < built_without
    x = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = f(x)
    expected = tape.gradient(y, x)
    graph_def = graph.as_graph_def()
    got = tf.compat.v1.wrap_function(
        lambda x: tf.graph_util.import_graph_def(
            graph_def, input_map={"x:0": x}, return_elements=[g.name])[0],
        [tf.TensorSpec([4, 3], tf.float64)])(x)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=0)


def test_vjp_on_tape_gives_the_tape_gradient_through_loops_conds_and_custom_gradients():
    """Recorded after the fact on a tape, ops already in the graph (a variable read, a
    ``while_loop`` and a ``cond``, a ``tf.custom_gradient``, a stopped mean, an integer
    shape) give what ``tf.GradientTape`` gives around the function, for a cotangent of
    each output; a ``tf.function`` called between is left to ``tf.gradients`` (``None``)."""
    import numpy as np

    rng = np.random.default_rng(5)
    x0, c0 = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    w0 = rng.standard_normal((3, 3))
    d0 = rng.standard_normal(())
    w = tf.Variable(w0)

    @tf.custom_gradient
    def clipped(t):
        return tf.identity(t), lambda dy: tf.clip_by_value(dy, -0.5, 0.5)

    def f(x):
        h = tf.tanh(x @ w)
        h = tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, tf.sin(h) * 1.5),
                          (tf.constant(0), h), maximum_iterations=3)[1]
        h = tf.cond(tf.reduce_sum(h) > 0, lambda: h * h, lambda: h - 1.0)
        mean = tf.stop_gradient(tf.reduce_mean(h, axis=0))
        h = clipped(h - mean) * tf.cast(tf.shape(h)[0], tf.float64)
        return h, tf.reduce_sum(h * x)

    x, c, d = tf.constant(x0), tf.constant(c0), tf.constant(d0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        ys = f(x)
    expected = tape.gradient(ys, [x, w], output_gradients=[c, d])

    @tf.function(jit_compile=True, autograph=False)
    def on_tape(x, c, d):
        ys = f(x)
        handle = _tf_internal.capture_in_current_graph(w.handle)
        grads = _tf_internal.vjp_on_tape(list(ys), [x, handle], [c, d], name="vjp")
        return [tf.convert_to_tensor(g) for g in grads]

    got = on_tape(x, c, d)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-15)

    inner = tf.function(lambda t: tf.tanh(t) * 2.0)

    @tf.function(autograph=False)
    def with_a_call(x, c):
        y = inner(x)
        assert _tf_internal.vjp_on_tape([y], [x], [c], name="vjp") is None
        return tf.gradients(y, x, grad_ys=c)[0]

    np.testing.assert_allclose(with_a_call(x, c).numpy(),
                               (2.0 * c0 * (1 - np.tanh(x0) ** 2)), rtol=1e-12)
