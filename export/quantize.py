"""fp32 ONNX graph → static INT8 Q/DQ graph (onnxruntime.quantization), with the fragile layers kept in float.

One graph for both consumers: ONNX Runtime (CPU, CUDA EP) and TensorRT's explicit quantization. Hence
symmetric int8 everywhere (zero point 0, as TensorRT requires): weights per output channel, activations per
tensor; biases stay float (TensorRT takes no int32 bias DequantizeLinear). Only Conv, MatMul and Gemm get
Q/DQ pairs; everything between them (GroupNorm, SiLU, residual adds, softmax) runs in float.

Layers kept in float (`KEEP_FLOAT`) were chosen by measurement (benchmarks/int8_sensitivity.py, recorded in
benchmarks/results/int8/int8_sensitivity.json): each candidate group quantized alone on top of the rest, the
images of a 20-step DDIM chain against fp32's. On the 0.7M-parameter 16×16 digits model (mean |Δ| with every
candidate in float 1.92/255): the first convolution quantized 2.25, the last 2.50 (both hurt: kept); the
timestep embedding 1.83 and attention 1.80 (no measurable effect at this model's 4×4 attention; kept anyway:
the timestep GEMMs have one row per image, nothing to gain, and at ddpm-cifar10's 16×16 attention the softmax
weights, about 1/256, fall below int8's step of 1/127 — not measured); GroupNorm: the quantized graph does
not load in ONNX Runtime (and a 45k-parameter model's quantizer run fails outright), and it is not where the
time goes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dtk.runtime.errors import DtkError

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# candidate float groups; the ops a group may add to QUANTIZED_OPS when it is measured quantized
GROUPS = {
    "first_conv": (),
    "last_conv": (),
    "timestep_embedding": (),
    "attention": ("Softmax",),
    "group_norm": ("InstanceNormalization",),
}
KEEP_FLOAT = ("first_conv", "last_conv", "timestep_embedding", "attention", "group_norm")
METHODS = ("minmax", "percentile", "entropy")
# "int8": Conv/MatMul outputs are quantized too and every consumer reads them back from int8 — what ONNX
# Runtime's CPU int8 kernels (QLinearConv) need; "float": only the int8 compute nodes read Q/DQ values, the
# float paths (residual adds, skip concatenations, GroupNorm) keep float tensors — closer to fp32, but ONNX
# Runtime then runs the convolutions in float (no speed-up on the CPU); TensorRT fuses either form.
OUTPUTS = ("int8", "float")
DEFAULT_METHOD = "minmax"
PERCENTILE = 99.999


@dataclass
class QuantizeResult:
    """What the quantization did, for the manifest's `quantization` section."""

    method: str
    outputs: str
    kept_float: dict  # group → node names left in float
    quantized: dict  # op type → count of nodes with Q/DQ on their inputs
    qdq_nodes: dict  # {"QuantizeLinear": n, "DequantizeLinear": m}
    seconds: float
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "weights": "int8, symmetric, per output channel",
            "activations": "int8, symmetric, per tensor",
            "bias": "float",
            "outputs": self.outputs,
            "calibration": {**self.calibration, "method": self.method},
            "quantized_ops": dict(self.quantized),
            "qdq_nodes": dict(self.qdq_nodes),
            "kept_float": {group: list(names) for group, names in self.kept_float.items()},
            "seconds": round(self.seconds, 2),
        }


def float_groups(model) -> dict[str, list[str]]:
    """Candidate group → names of its nodes in `model` (an fp32 ModelProto with named nodes)."""
    from dtk.export.fp16 import attention_core, graph_links, timestep_branch, value_types

    graph = model.graph
    nodes = list(graph.node)
    producer, consumers, initializers = graph_links(graph)
    matmuls = {"MatMul", "Gemm"}

    timestep = [i for i in timestep_branch(graph, value_types(model)) if nodes[i].op_type in matmuls]
    attention = set()
    for i, node in enumerate(nodes):
        if node.op_type == "Softmax":
            core = attention_core(graph, i, producer, consumers, initializers)
            attention |= {j for j in core if nodes[j].op_type in (*matmuls, "Softmax")}
    return {
        "first_conv": [nodes[i].name for i in _nearest_convs(nodes, "sample", consumers, forward=True)],
        "last_conv": [nodes[i].name for i in _nearest_convs(nodes, "model_output", producer, forward=False)],
        "timestep_embedding": [nodes[i].name for i in timestep],
        "attention": [nodes[i].name for i in sorted(attention)],
        "group_norm": [n.name for n in nodes if n.op_type == "InstanceNormalization"],
    }


def _nearest_convs(nodes, start: str, links, forward: bool) -> list[int]:
    """Conv nodes reached from tensor `start` (downstream when `forward`, else upstream) before any other."""
    found, seen, frontier = set(), set(), [start]
    while frontier:
        name = frontier.pop()
        hops = links.get(name, []) if forward else [links[name]] if name in links else []
        for i in hops:
            if i in seen:
                continue
            seen.add(i)
            if nodes[i].op_type == "Conv":
                found.add(i)
            else:
                frontier.extend(nodes[i].output if forward else nodes[i].input)
    return sorted(found)


def name_nodes(model) -> None:
    """Give every unnamed node a unique name: quantize_static's exclusions go by name."""
    taken = Counter(n.name for n in model.graph.node if n.name)
    for i, node in enumerate(model.graph.node):
        if not node.name or taken[node.name] > 1:
            node.name = f"{node.op_type}_{i}"


def quantize(
    fp32_path,
    int8_path,
    calibration,
    *,
    keep_float=KEEP_FLOAT,
    method: str = DEFAULT_METHOD,
    outputs: str = "int8",
) -> QuantizeResult:
    """Quantize the graph at `fp32_path` into `int8_path`, calibrated on `calibration`
    (a dtk.export.calibration.CalibrationSet)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from dtk.export.calibration import reader

    if outputs not in OUTPUTS:
        raise DtkError(f"unknown int8 outputs {outputs!r}; choose one of {', '.join(OUTPUTS)}")
    if method not in METHODS:
        raise DtkError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(keep_float) - set(GROUPS)
    if unknown:
        raise DtkError(f"unknown float groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    start = time.perf_counter()
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    model = onnx.load(str(fp32_path))
    name_nodes(model)
    onnx.save_model(model, str(fp32_path))
    groups = float_groups(model)
    op_types = set(QUANTIZED_OPS)
    for group, extra in GROUPS.items():
        if group not in keep_float:
            op_types |= set(extra)
    excluded = sorted({name for group in keep_float for name in groups[group]})
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with _quiet():
        quantize_static(
            str(fp32_path),
            str(int8_path),
            reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=sorted(op_types),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=methods[method],
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "CalibPercentile": PERCENTILE,
            },
        )
    quantized = onnx.load(str(int8_path))
    if outputs == "float":
        float_paths_stay_float(quantized, op_types)
        onnx.save_model(quantized, str(int8_path))
    return QuantizeResult(
        method=method,
        outputs=outputs,
        kept_float={group: groups[group] for group in keep_float},
        quantized=quantized_ops(quantized),
        qdq_nodes=dict(
            Counter(
                n.op_type for n in quantized.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            )
        ),
        seconds=time.perf_counter() - start,
        calibration=calibration.to_dict(),
    )


def float_paths_stay_float(model, op_types) -> None:
    """Nodes that compute in float (residual adds, skip concatenations, reshapes) read the float tensor, not
    its int8 round trip: quantize_static hands every consumer of a quantized tensor the DequantizeLinear
    output, which would put int8 rounding on the residual stream. Q/DQ pairs left unread are removed."""
    graph = model.graph
    quantize_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    float_of = {  # DequantizeLinear output → the float tensor it stands for (activations only)
        n.output[0]: quantize_input[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantize_input
    }
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type in op_types or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            if name in float_of and name not in outputs:
                node.input[k] = float_of[name]
    while True:  # drop Q/DQ nodes nothing reads any more
        read = {name for n in graph.node for name in n.input} | outputs
        unread = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in read
        ]
        if not unread:
            break
        for n in unread:
            graph.node.remove(n)
    read = {name for n in graph.node for name in n.input}
    unused = [t for t in graph.initializer if t.name not in read]
    for t in unused:  # the removed pairs' scales and zero points
        graph.initializer.remove(t)


def quantized_ops(model) -> dict[str, int]:
    """op type → how many nodes read a DequantizeLinear output (the nodes computing on int8 values)."""
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return dict(
        Counter(
            n.op_type
            for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq_outputs.intersection(n.input)
        )
    )


@contextlib.contextmanager
def _quiet():
    """quantize_static logs its progress and warns about pre-processing; keep the export's output clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
