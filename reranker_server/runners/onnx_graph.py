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

ONNX_GRAPHS = ("exact", "fast")
FAST_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
FAST_CONFIG = {"optimization.enable_gelu_approximation": "1"}
MASK = "attention_mask"
# Larger files (external weights, protobuf's 2 GB limit) keep their mask.
MAX_REWRITE_BYTES = 1 << 30


def unmasked(onnx_file: Path) -> bytes | None:
    """The model without the attention mask's additions, serialized; None when it has no
    `attention_mask` input, no such addition, is too large to rewrite, or its mask bias is not
    zero for an all-ones mask (checked by running the mask's own subgraph)."""
    if onnx_file.stat().st_size > MAX_REWRITE_BYTES:
        return None
    model = onnx.load(str(onnx_file))
    graph = model.graph
    inputs = {i.name for i in graph.input}
    if MASK not in inputs:
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
    outputs = {o.name for o in graph.output}
    if not bypass or outputs & bypass.keys() or not _all_zero(model, sorted(set(biases))):
        return None
    kept = [n for n in graph.node if not (n.output and n.output[0] in bypass)]
    for node in kept:
        for k, name in enumerate(node.input):
            node.input[k] = bypass.get(name, name)
    del graph.node[:]
    graph.node.extend(_live(kept, outputs))
    if MASK not in {name for n in graph.node for name in n.input}:
        graph.input.remove(next(i for i in graph.input if i.name == MASK))
    logger.info("%s: %d attention-mask additions removed", onnx_file.name, len(bypass))
    return model.SerializeToString()


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
    feed = {i.name: np.ones((1, 8), dtype=np.int64) for i in session.get_inputs()}
    return all(not np.any(np.asarray(out)) for out in session.run(None, feed))


def fast_options(options: ort.SessionOptions) -> None:
    """The fast graph's session settings (with `FAST_DISABLED_OPTIMIZERS` passed to the
    session)."""
    for key, value in FAST_CONFIG.items():
        options.add_session_config_entry(key, value)
