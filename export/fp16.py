"""fp32 ONNX graph → mixed fp16 graph that keeps the numerically fragile parts in fp32, with fp32 I/O.

Kept in fp32: normalization (GroupNorm as exported — Reshape, InstanceNormalization, Reshape, Mul, Add — and
LayerNorm), softmax with the attention matmuls around it, reductions and exp/log/pow, and the whole timestep
branch (every node computed from `timestep` alone: sinusoidal embedding, time MLP, per-block projections).
Everything else (convolutions, linear layers, activations, residual adds) runs in fp16. Explicit Cast nodes
sit on every boundary, so the graph means the same to ONNX Runtime and to TensorRT's strongly typed builder.

Written here rather than with onnxconverter-common, whose keep_io_types output ONNX Runtime refused to load
(see MEASURED.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
NORM_OPS = {"InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization"}
FRAGILE_OPS = {
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Sin",
    "Cos",
    "Range",
}
ATTENTION_PATH = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose"}
MATMUL_OPS = {"MatMul", "Gemm", "Einsum"}


@dataclass
class Fp16Report:
    """What the conversion did, for the manifest."""

    fp16_nodes: int = 0
    fp32_nodes: dict = field(default_factory=dict)  # reason -> count
    casts: int = 0
    clipped_values: int = 0

    def to_dict(self) -> dict:
        return {
            "fp16_nodes": self.fp16_nodes,
            "fp32_nodes": dict(self.fp32_nodes),
            "casts": self.casts,
            "clipped_initializer_values": self.clipped_values,
        }


def convert_to_fp16(model, report: Fp16Report | None = None):
    """Return a new ModelProto: fp16 compute where safe, fp32 graph inputs and outputs."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = report if report is not None else Fp16Report()
    _constants_to_initializers(out.graph)
    types = value_types(out)
    keep = _fp32_nodes(out.graph, types)
    _Converter(out.graph, types, keep, _opset(out), report).run()
    del out.graph.value_info[:]
    return out


def value_types(model) -> dict[str, int]:
    """Element type of every tensor, from shape inference on a copy without weight data (works past 2 GB)."""
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:
        _strip_data(init)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return types


def _strip_data(tensor) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(name)
    tensor.ClearField("external_data")
    tensor.data_location = 0


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _constants_to_initializers(graph) -> None:
    """Constant nodes holding a tensor become initializers, so one rule decides their precision."""
    keep = []
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value":
            tensor = graph.initializer.add()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def graph_links(graph) -> tuple[dict[str, int], dict[str, list[int]], set[str]]:
    """The graph's edges by node index: tensor → the node writing it, tensor → the nodes reading it; and the
    initializers' names."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    return producer, consumers, {t.name for t in graph.initializer}


def _fp32_nodes(graph, types) -> dict[int, str]:
    """index of each node that stays fp32 → why."""
    producer, consumers, initializers = graph_links(graph)
    keep: dict[int, str] = {}

    for i in timestep_branch(graph, types):
        keep[i] = "timestep"
    for i, node in enumerate(graph.node):
        if node.op_type in NORM_OPS:
            for j in _norm_pattern(graph, i, producer, consumers, initializers):
                keep.setdefault(j, "normalization")
        elif node.op_type == "Softmax":
            for j in attention_core(graph, i, producer, consumers, initializers):
                keep.setdefault(j, "attention")
        elif node.op_type in FRAGILE_OPS:
            keep.setdefault(i, "reduction/exp")
        elif node.domain not in ("", "ai.onnx") or any(a.type in (5, 10) for a in node.attribute):
            keep.setdefault(i, "other")  # custom domains and nodes with subgraphs (If, Loop, Scan)
    return keep


def timestep_branch(graph, types) -> list[int]:
    """Nodes whose float inputs derive from `timestep` and not from `sample` (float data edges only)."""
    origin = {"timestep": {"timestep"}, "sample": {"sample"}}
    branch = []
    for i, node in enumerate(graph.node):
        sources = set()
        for name in node.input:
            if types.get(name) == FLOAT:
                sources |= origin.get(name, set())
        for name in node.output:
            if types.get(name) == FLOAT and sources:
                origin[name] = sources
        if sources == {"timestep"}:
            branch.append(i)
    return branch


def _single_consumer(name, consumers) -> int | None:
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 else None


def _norm_pattern(graph, i, producer, consumers, initializers) -> list[int]:
    """The normalization node, plus GroupNorm's decomposition around InstanceNormalization."""
    nodes = [i]
    if graph.node[i].op_type != "InstanceNormalization":
        return nodes
    before = producer.get(graph.node[i].input[0])
    if before is not None and graph.node[before].op_type == "Reshape":
        nodes.append(before)
    current = i
    for op in ("Reshape", "Mul", "Add"):
        nxt = _single_consumer(graph.node[current].output[0], consumers)
        if nxt is None or graph.node[nxt].op_type != op:
            break
        if op != "Reshape" and not any(name in initializers for name in graph.node[nxt].input):
            break
        nodes.append(nxt)
        current = nxt
    return nodes


def attention_core(graph, i, producer, consumers, initializers) -> list[int]:
    """Softmax, the path back to the QKᵀ matmul (scale, mask), its scaled operands, and softmax·V."""
    nodes = [i]
    current = graph.node[i]
    for _ in range(8):  # walk back through scale / mask / reshape to the matmul
        data = [name for name in current.input if name and name not in initializers]
        j = producer.get(data[0]) if data else None
        if j is None:
            break
        nodes.append(j)
        current = graph.node[j]
        if current.op_type in MATMUL_OPS:
            for name in current.input:  # scaled q and k (q·√s, kᵀ·√s)
                k = producer.get(name)
                scaled = k is not None and graph.node[k].op_type in ("Mul", "Div")
                if scaled and any(x in initializers for x in graph.node[k].input):
                    nodes.append(k)
            break
        if current.op_type not in ATTENTION_PATH:
            nodes.pop()
            break
    for j in consumers.get(graph.node[i].output[0], []):
        if graph.node[j].op_type in MATMUL_OPS:
            nodes.append(j)
    return nodes


class _Converter:
    """Retypes the fp16 region, converts the weights it reads, and inserts Casts on every boundary."""

    def __init__(self, graph, types, keep, opset, report):
        self.graph, self.types, self.keep, self.opset, self.report = graph, types, keep, opset, report
        self.half: set[str] = set()  # tensors that will hold fp16
        self.wants: dict[tuple[int, int], int] = {}  # (node, input index) -> required elem type

    def run(self) -> None:
        import onnx

        for i, node in enumerate(self.graph.node):
            if i in self.keep:
                self._require_fp32(i, node)
            elif self._retype(i, node):
                self.report.fp16_nodes += any(name in self.half for name in node.output)
            else:
                self.keep[i] = "unsupported in fp16"
                self._require_fp32(i, node)
        self.report.fp32_nodes = dict(Counter(self.keep.values()))
        self._convert_initializers()
        self._insert_casts(onnx)

    def _schema(self, node):
        import onnx

        try:
            return onnx.defs.get_schema(node.op_type, self.opset, node.domain or "")
        except onnx.defs.SchemaError:
            return None

    @staticmethod
    def _formal(params, index):
        return params[min(index, len(params) - 1)] if params else None

    def _require_fp32(self, i, node) -> None:
        for k, name in enumerate(node.input):
            if name and self.types.get(name) == FLOAT:
                self.wants[(i, k)] = FLOAT

    def _retype(self, i, node) -> bool:
        """Mark node i as computing in fp16; False when its schema does not allow fp16."""
        import onnx

        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == FLOAT:
                to.i = FLOAT16
                self.half.add(node.output[0])
            return True
        if node.op_type == "ConstantOfShape":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == FLOAT:
                    value = onnx.numpy_helper.to_array(attr.t).astype(np.float16)
                    attr.t.CopyFrom(onnx.numpy_helper.from_array(value, attr.t.name))
                    self.half.add(node.output[0])
            return True
        schema = self._schema(node)
        if schema is None:
            return False
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        outputs = {self._formal(schema.outputs, k).type_str for k in range(len(node.output))}
        tied = {t for t in outputs if "tensor(float16)" in allowed.get(t, ())}
        float_inputs = [k for k, n in enumerate(node.input) if n and self.types.get(n) == FLOAT]
        if any(self._formal(schema.inputs, k).type_str in outputs - tied for k in float_inputs):
            return False  # a float input shares a type with an output that cannot be fp16
        for k in float_inputs:
            type_str = self._formal(schema.inputs, k).type_str
            if type_str in tied:
                self.wants[(i, k)] = FLOAT16
            elif type_str == "tensor(float)":
                self.wants[(i, k)] = FLOAT
        for k, name in enumerate(node.output):
            if name and self.types.get(name) == FLOAT and self._formal(schema.outputs, k).type_str in tied:
                self.half.add(name)
        return True

    def _convert_initializers(self) -> None:
        """A weight read only in fp16 is stored in fp16; one read both ways gets an fp16 copy."""
        import onnx

        by_name = {t.name: t for t in self.graph.initializer}
        readers: dict[str, set[int]] = {}
        for (i, k), wanted in self.wants.items():
            name = self.graph.node[i].input[k]
            if name in by_name:
                readers.setdefault(name, set()).add(wanted)
        for name, wanted in readers.items():
            if FLOAT16 not in wanted:
                continue
            tensor = by_name[name]
            values = onnx.numpy_helper.to_array(tensor)
            overflow = int(np.count_nonzero(np.abs(values) > FP16_MAX))
            self.report.clipped_values += overflow
            half = onnx.numpy_helper.from_array(np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), name)
            if wanted == {FLOAT16}:
                tensor.CopyFrom(half)
                self.half.add(name)
            else:
                half.name = f"{name}__fp16"
                self.graph.initializer.append(half)
                self.half.add(half.name)
                self._rename_readers(name, half.name, FLOAT16)

    def _rename_readers(self, name, new_name, wanted) -> None:
        for (i, k), w in self.wants.items():
            node = self.graph.node[i]
            if w == wanted and node.input[k] == name:
                node.input[k] = new_name

    def _insert_casts(self, onnx) -> None:
        graph = self.graph
        outputs = {o.name for o in graph.output}
        casts: dict[tuple[str, int], str] = {}  # (tensor, to) -> cast output name
        after: dict[str, list] = {}  # producer tensor -> casts to place right after its producer
        for (i, k), wanted in sorted(self.wants.items()):
            node = graph.node[i]
            name = node.input[k]
            actual = FLOAT16 if name in self.half else FLOAT
            if actual == wanted:
                continue
            key = (name, wanted)
            if key not in casts:
                casts[key] = f"{name}__{'fp16' if wanted == FLOAT16 else 'fp32'}"
                after.setdefault(name, []).append(_cast(onnx, name, casts[key], wanted))
            node.input[k] = casts[key]
        for name in outputs & self.half:  # fp32 graph outputs: rename the fp16 tensor, cast into the name
            internal = f"{name}__fp16"
            for node in graph.node:
                node.output[:] = [internal if o == name else o for o in node.output]
                node.input[:] = [internal if x == name else x for x in node.input]
            for cast_list in after.values():
                for cast in cast_list:
                    cast.input[:] = [internal if x == name else x for x in cast.input]
            after.setdefault(internal, []).append(_cast(onnx, internal, name, FLOAT))
            if name in after:
                after[internal].extend(after.pop(name))

        nodes = []
        produced_by_graph = [v.name for v in graph.input] + [t.name for t in graph.initializer]
        for name in produced_by_graph:
            nodes.extend(after.pop(name, []))
        for node in graph.node:
            nodes.append(node)
            for out in node.output:
                nodes.extend(after.pop(out, []))
        self.report.casts = sum(1 for n in nodes if n.op_type == "Cast" and n.name.startswith("dtk_cast"))
        del graph.node[:]
        graph.node.extend(nodes)


def _cast(onnx, source: str, target: str, to: int):
    return onnx.helper.make_node("Cast", [source], [target], name=f"dtk_cast_{target}", to=to)
