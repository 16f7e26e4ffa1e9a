"""The `fast` ONNX graph of a stage (`onnx_graph = "fast"`): the same file, run with less work.

ONNX Runtime fuses a cross-encoder's graph when it loads it. Measured on this project's 2-core
AVX-512 VNNI CPU (bench/cpu_cascade.py, docs/models.md), two of its choices cost time when each
pair runs alone, as int8 files do (onnx_base.py):

- the attention mask: its additive bias, (1 - mask) x min, is all zeros for a pair without
  padding, yet every layer adds it to the attention scores. `unmasked` removes those additions
  (exact: x + 0 is x) and, when nothing else reads it, the `attention_mask` input;
- `SkipLayerNormalization`: the fused residual-add + layer norm runs several times slower than
  the `Add` + `LayerNormalization` it replaces at these shapes, so the fast graph turns that
  fusion off, and lets ONNX Runtime use the tanh approximation of GELU.

The last two change the arithmetic slightly, and an int8 model re-quantizes every activation, so
scores drift (figures in docs/models.md); the default, `exact`, is the file as ONNX Runtime runs
it by default: FlashRank's own scores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

FAST_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
FAST_CONFIG = {"optimization.enable_gelu_approximation": "1"}
MASK = "attention_mask"
# Larger files (external weights, protobuf's 2 GB limit) keep their mask.
MAX_REWRITE_BYTES = 1 << 30


def unmasked(onnx_file: Path) -> bytes | None:
    """The model without the attention mask's additions, serialized; None when it has no
    `attention_mask` input, no such addition, weights outside the file or over
    `MAX_REWRITE_BYTES`, a mask bias that is not zero for an all-ones mask (checked by running
    the mask's own subgraph), or anything else the rewrite can't be sure of (logged: the stage
    then runs the file with its mask, the rest of the fast graph still applies)."""
    try:
        return _unmasked(onnx_file)
    except Exception as exc:  # a graph this rewrite does not know: keep the mask
        logger.warning("%s: attention mask kept (%s: %s)", onnx_file.name, type(exc).__name__, exc)
        return None


def _unmasked(onnx_file: Path) -> bytes | None:
    if onnx_file.stat().st_size > MAX_REWRITE_BYTES:
        return None
    model = onnx.load(str(onnx_file), load_external_data=False)
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        return None
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    if MASK not in inputs or MASK in outputs:
        return None
    pure_mask, data = _dependence(graph.node, inputs)
    bypass: dict[str, str] = {}  # an addition's output -> its data input
    biases: list[str] = []
    for node in graph.node:
        if node.op_type == "Add" and len(node.input) == 2:
            a, b = node.input
            if a in pure_mask and b in data:
                bypass[node.output[0]], bias = b, a
            elif b in pure_mask and a in data:
                bypass[node.output[0]], bias = a, b
            else:
                continue
            biases.append(bias)
    if not bypass or outputs & bypass.keys() or not _all_zero(model, sorted(set(biases))):
        return None
    kept = [n for n in graph.node if not (n.output and n.output[0] in bypass)]
    for node in kept:
        for k, name in enumerate(node.input):
            while name in bypass:  # additions in a row
                name = bypass[name]
            node.input[k] = name
    del graph.node[:]
    graph.node.extend(_live(kept, outputs))
    if MASK not in {name for n in graph.node for name in n.input}:
        graph.input.remove(next(i for i in graph.input if i.name == MASK))
    data_out = model.SerializeToString()
    # the rewritten graph must give the same outputs as the file on an unpadded probe
    if not _same_outputs(onnx_file, data_out):
        return None
    logger.info("%s: %d attention-mask additions removed", onnx_file.name, len(bypass))
    return data_out


def _dependence(nodes: Iterable[onnx.NodeProto], inputs: set[str]) -> tuple[set[str], set[str]]:
    """(values computed from the mask's data alone, values computed from the other inputs'
    data). A `Shape` output depends on no data."""
    mask, data = {MASK}, inputs - {MASK}
    for node in nodes:  # ONNX stores nodes in topological order
        if node.op_type == "Shape":
            continue
        names = [name for name in node.input if name]
        if any(name in data for name in names):
            data.update(node.output)
        if any(name in mask for name in names):
            mask.update(node.output)
    return mask - data, data


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` less those whose outputs nothing reads (the mask's subgraph, once bypassed)."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    return live[::-1]


def _all_zero(model: onnx.ModelProto, values: list[str]) -> bool:
    """Whether the mask biases `values` are exactly 0 for an unpadded 8-token input."""
    nodes = _live(list(model.graph.node), set(values))
    used = {name for n in nodes for name in n.input}
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            nodes,
            "mask-bias",
            [i for i in model.graph.input if i.name in used],
            [onnx.helper.make_empty_tensor_value_info(v) for v in values],
            [t for t in model.graph.initializer if t.name in used],
        ),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    feed = _probe_feed(session)
    return all(not np.any(np.asarray(out)) for out in session.run(None, feed))


def _probe_feed(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Ones for every input, 1 x 8, in each input's own integer type."""
    types = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}
    return {
        i.name: np.ones((1, 8), dtype=types.get(i.type, np.int64)) for i in session.get_inputs()
    }


def _same_outputs(onnx_file: Path, rewritten: bytes) -> bool:
    """Whether the rewritten graph gives exactly the file's outputs on an unpadded probe (it
    would not if a bypassed addition broadcast its data input to a larger shape)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    original = ort.InferenceSession(
        str(onnx_file), sess_options=options, providers=["CPUExecutionProvider"]
    )
    bare = ort.InferenceSession(rewritten, sess_options=options, providers=["CPUExecutionProvider"])
    feed = _probe_feed(original)
    expected = original.run(None, feed)
    got = bare.run(
        None, {k: v for k, v in feed.items() if k in {i.name for i in bare.get_inputs()}}
    )
    return all(
        np.shape(a) == np.shape(b) and np.array_equal(a, b)
        for a, b in zip(expected, got, strict=True)
    )


def fast_options(options: ort.SessionOptions) -> None:
    """The fast graph's session settings (with `FAST_DISABLED_OPTIMIZERS` passed to the
    session)."""
    for key, value in FAST_CONFIG.items():
        options.add_session_config_entry(key, value)
