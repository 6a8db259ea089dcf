"""What each stage piece (the GraphDefs a stage's forward and backward are imported from)
carries: only the library functions it calls."""

import tensorflow as tf
from models import cond_between_cuts, nested_functions, while_between_cuts

import gradsplit_compiler as gsc


def _called(graph_def):
    """Names of functions the piece's nodes and its library functions refer to."""
    names = {f.signature.name for f in graph_def.library.function}
    refs = set()

    def attrs(values):
        for value in values:
            if value.HasField("func"):
                refs.add(value.func.name)
            if value.HasField("list"):
                refs.update(f.name for f in value.list.func)

    for nd in graph_def.node:
        refs.add(nd.op)
        attrs(nd.attr.values())
    for fdef in graph_def.library.function:
        for nd in fdef.node_def:
            refs.add(nd.op)
            attrs(nd.attr.values())
    return refs & names


def test_pieces_without_control_flow_carry_no_functions():
    case = nested_functions()  # tf.functions inlined: the program library is unused
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    assert len(split.graph.graph["library"].function) > 0
    for stage in split.stages:
        for piece in (stage._vjp.forward_graph_def, stage._vjp.backward_graph_def):
            assert len(piece.library.function) == 0


def test_a_control_flow_piece_carries_exactly_the_functions_it_calls():
    for build in (cond_between_cuts, while_between_cuts):
        case = build()
        split = gsc.split(case.fn, case.input_signature, case.cuts)
        carried = 0
        for stage in split.stages:
            for piece in (stage._vjp.forward_graph_def, stage._vjp.backward_graph_def):
                names = {f.signature.name for f in piece.library.function}
                assert _called(piece) == names, build.__name__
                carried += len(names)
        assert carried > 0, build.__name__
        args = case.args(1)
        value, grads = split.value_and_gradients(*args, jit_compile=False)
        assert all(g is not None for g in grads)
        assert tf.math.is_finite(value)
