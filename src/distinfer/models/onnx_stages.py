"""Any ONNX file as a `StagedModel`: the graph cut into subgraphs at tensors, one per stage.

Layers. `planning.onnx_graph.GraphCuts` sorts the nodes, drops the ones no output needs and
takes as cut points the node boundaries crossed by the fewest values (see there); the runs of
nodes between them are the layers. Types for the values crossing a cut come from ONNX shape
inference, run on a copy of the graph whose large initializers are declared as inputs instead,
so that it stays small and any model size works.

Stages. In the driver `prepare_stages` writes each stage's subgraph, holding only the
initializers (and Constant nodes) its nodes read, to
`<tempdir>/distinfer-onnx-stages/<key>/layers-<start>-<stop>.onnx`, where the key hashes the
model file's path, size and mtime. A subgraph depends on the model and its layer range alone,
so a file per range (rather than a directory per plan) lets a stage process find its file from
`build_stage(start, stop)`, and plans that share a range share the file. Files are written under
a temporary name and renamed, so a concurrent reader sees a whole file or none. The names a
stage hands on are stored in the file's metadata. A stage process that finds no file (another
machine, a cleaned tempdir) extracts it itself, which reads the whole model once.

A stage is a callable from a dict of arrays to a dict of arrays: its session reads the values
its subgraph needs and computes the ones it makes; values it only passes along (a mask every
block reads, an input only the last layers read) go from its input dict to its output dict
untouched. The last stage returns the model outputs, named and ordered as `OnnxRunner` does.

Costs. `layer_costs` runs every layer's subgraph with ONNX Runtime (one thread) on generated
inputs: dynamic dimensions become `batch_size` (the first) or `seq_len` (the others), floats are
random and integers and booleans zero. When that fails (an input that cannot be generated, an
operator that rejects zeros), each layer's time is taken as proportional to its weight bytes
(`SECONDS_PER_WEIGHT_BYTE`) and its output bytes come from the inferred shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..planning.cuts import LayerCost
from ..planning.onnx_graph import GraphCuts, GraphNode
from .base import Batches, Column
from .onnx_runner import ONNX_TYPES, InputSpec, open_session, prepare_inputs
from .staged import StagedModel

__all__ = ["SECONDS_PER_WEIGHT_BYTE", "OnnxInputs", "OnnxStage", "OnnxStaged"]

log = logging.getLogger(__name__)

SECONDS_PER_WEIGHT_BYTE = 1e-10  # the fallback cost: weights streamed once per batch at 10 GB/s
_FORMAT = "1"  # part of the cache key: bump when the layers or the files change
_META = "distinfer.stage"  # metadata key: {"returns": names handed on, in order; "last": bool}
_INLINE_BYTES = 1024  # initializers up to this size stay in the graph for shape inference
_EXTERNAL_BYTES = 1 << 30  # stage files with more weights keep them in a side file (protobuf's 2 GiB)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelError("cutting ONNX models into stages needs the onnx package; install it with: "
                         "pip install onnx") from None
    return onnx


class OnnxInputs:
    """The first stage's input side: checks and batches exactly like `OnnxRunner.prepare`."""

    def __init__(self, specs: tuple[InputSpec, ...]) -> None:
        self.specs = {s.name: s for s in specs}
        self.input_names = tuple(self.specs)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return prepare_inputs(self.specs, inputs, batch_size)


class OnnxStage:
    """One stage's subgraph in an ONNX Runtime session (see the module docstring)."""

    def __init__(self, session: Any, returns: tuple[str, ...], is_last: bool) -> None:
        self.session = session
        self.reads = tuple(i.name for i in session.get_inputs())
        self.makes = tuple(o.name for o in session.get_outputs())
        self.returns = returns
        self.is_last = is_last

    def __call__(self, x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        made = self.session.run(list(self.makes), {name: x[name] for name in self.reads})
        computed = dict(zip(self.makes, made, strict=True))
        return {n: np.asarray(computed[n]) if n in computed else x[n] for n in self.returns}


@dataclass
class _Graph:
    model: Any  # onnx.ModelProto, weights loaded
    cuts: GraphCuts
    infos: dict[str, Any]  # value name -> ValueInfoProto (declared or inferred)
    inputs: tuple[InputSpec, ...]


class OnnxStaged(StagedModel):
    """An ONNX file cut into pipeline stages (see the module docstring). Only the path is
    kept when pickled; the graph is read on first use."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._graph: _Graph | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "_graph": None}

    def graph(self) -> _Graph:
        if self._graph is None:
            self._graph = _read_graph(self.name)
        return self._graph

    def layer_names(self) -> list[str]:
        return list(self.graph().cuts.names)

    def weight_bytes(self) -> list[int]:
        """Bytes of the initializers and Constant values each layer reads; a weight that several
        layers read counts in each, as each stage holding one of them holds a copy."""
        g = self.graph()
        nodes = g.model.graph.node
        sizes = {t.name: _tensor_bytes(t) for t in _initializers(g.model.graph)}
        result = []
        for i in range(len(g.cuts.names)):
            piece = g.cuts.piece(i, i + 1)
            constants = sum(_constant_bytes(nodes[n]) for n in piece.nodes if nodes[n].op_type == "Constant")
            result.append(constants + sum(sizes.get(v, 0) for v in piece.reads))
        return result

    def layer_costs(self, batch_size: int, seq_len: int) -> list[LayerCost]:
        from .profile import profile_layers

        g = self.graph()
        weights = self.weight_bytes()
        try:
            layers = [self._stage(_extract(g, i, i + 1).SerializeToString(), 1, "cpu")
                      for i in range(len(g.cuts.names))]
            example = _example_inputs(g.inputs, batch_size, seq_len)
            costs = profile_layers(layers, example, g.cuts.names, repeats=2)
        except Exception as exc:  # whatever ONNX Runtime raises for inputs it cannot take
            log.warning("timing the layers of '%s' failed (%s); costs follow weight bytes", self.name, exc)
            return [
                LayerCost(name, (w + 1) * SECONDS_PER_WEIGHT_BYTE, w,
                          _estimated_bytes(g, g.cuts.crossing(g.cuts.bounds[i + 1]), batch_size, seq_len))
                for i, (name, w) in enumerate(zip(g.cuts.names, weights, strict=True))
            ]
        return [replace(c, weight_bytes=w) for c, w in zip(costs, weights, strict=True)]

    def prepare_stages(self, stages: tuple[tuple[int, int], ...]) -> None:
        names = self.layer_names()
        if len(stages) > len(names):
            raise ModelError(
                f"the ONNX model '{self.name}' has {len(names)} layers that a cut may fall between "
                f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}), too few for "
                f"{len(stages)} stages; ask for {len(names)} or fewer"
            )
        ends = [0, *(stop for _, stop in stages)]
        if [start for start, _ in stages] != ends[:-1] or ends[-1] != len(names) or any(
            stop <= start for start, stop in stages
        ):
            raise ModelError(f"stages {stages} do not cover the {len(names)} layers of '{self.name}'")
        for start, stop in stages:
            if not self._stage_file(start, stop).exists():
                self._write_stage(start, stop)
        self._input_specs()

    def preparer(self, device: str) -> OnnxInputs:
        return OnnxInputs(self._input_specs())

    def build_stage(self, start: int, stop: int, device: str, threads: int) -> OnnxStage:
        path = self._stage_file(start, stop)
        if not path.exists():  # no file from the driver here: extract it, reading the whole model
            path = self._write_stage(start, stop)
        return self._stage(str(path), threads, device)

    def _stage(self, model: str | bytes, threads: int, device: str) -> OnnxStage:
        session = open_session(model, threads, device, self.name)
        meta = json.loads(session.get_modelmeta().custom_metadata_map[_META])
        return OnnxStage(session, tuple(meta["returns"]), bool(meta["last"]))

    def _cache(self) -> Path:
        try:
            st = os.stat(self.name)
        except OSError:
            raise ModelError(f"ONNX model '{self.name}' does not exist") from None
        key = f"{os.path.abspath(self.name)}\0{st.st_size}\0{st.st_mtime_ns}\0{_FORMAT}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return Path(tempfile.gettempdir()) / "distinfer-onnx-stages" / digest

    def _stage_file(self, start: int, stop: int) -> Path:
        return self._cache() / f"layers-{start}-{stop}.onnx"

    def _write_stage(self, start: int, stop: int) -> Path:
        g = self.graph()
        model = _extract(g, start, stop)
        weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
        path = self._stage_file(start, stop)
        with _atomic(path) as tmp:
            if weights > _EXTERNAL_BYTES:
                data = path.name + ".data"
                _onnx().save_model(model, str(tmp), save_as_external_data=True,
                                   all_tensors_to_one_file=True, location=data, size_threshold=1024)
                os.replace(tmp.parent / data, path.parent / data)  # before the file that names it
            else:
                _onnx().save_model(model, str(tmp))
        return path

    def _input_specs(self) -> tuple[InputSpec, ...]:
        """The model inputs: from the driver's `inputs.json` when there, else from the graph."""
        path = self._cache() / "inputs.json"
        if path.exists() and self._graph is None:
            return tuple(InputSpec(n, t, tuple(s)) for n, t, s in json.loads(path.read_text()))
        specs = self.graph().inputs
        if not path.exists():
            with _atomic(path) as tmp:
                tmp.write_text(json.dumps([[s.name, s.type, list(s.shape)] for s in specs]))
        return specs


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed to it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(dir=path.parent, prefix=".part-"))
    try:
        yield part / path.name
        os.replace(part / path.name, path)
    finally:
        shutil.rmtree(part, ignore_errors=True)


def _read_graph(path: str) -> _Graph:
    onnx = _onnx()
    try:
        model = onnx.load(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load ONNX model '{path}': {first}") from None
    g = model.graph
    static = {t.name for t in _initializers(g)}
    infos = _value_infos(model)
    typed = {name for name, info in infos.items() if _has_type(info)}
    nodes = [GraphNode(n.op_type, _node_reads(n), tuple(n.output), _foldable(n)) for n in g.node]
    real = [i for i in g.input if i.name not in static]
    cuts = GraphCuts(nodes, [i.name for i in real], [o.name for o in g.output], static, typed)
    return _Graph(model, cuts, infos, tuple(_input_spec(i) for i in real))


def _extract(g: _Graph, start: int, stop: int) -> Any:
    """Layers [start, stop) as an ONNX model: their nodes, the initializers and Constant nodes
    they read, the crossing values as inputs and outputs, the names to hand on as metadata."""
    onnx = _onnx()
    piece = g.cuts.piece(start, stop)
    graph = g.model.graph
    nodes = [graph.node[i] for i in piece.nodes]
    outputs = set(piece.outputs)
    inner = [g.infos[o] for n in nodes for o in n.output if o in g.infos and o not in outputs]
    sub = onnx.helper.make_graph(
        nodes, f"{graph.name or 'graph'}-layers-{start}-{stop}",
        [_info(g, v) for v in piece.inputs], [_info(g, v) for v in piece.outputs],
        [t for t in graph.initializer if t.name in piece.reads], value_info=inner,
        sparse_initializer=[t for t in graph.sparse_initializer if t.values.name in piece.reads],
    )
    model = onnx.helper.make_model(sub, opset_imports=g.model.opset_import, functions=g.model.functions)
    model.ir_version = g.model.ir_version
    last = stop == len(g.cuts.names)
    onnx.helper.set_model_props(model, {_META: json.dumps({"returns": piece.returns, "last": last})})
    return model


def _info(g: _Graph, name: str) -> Any:
    if name not in g.infos:
        raise ModelError(f"the type of ONNX value '{name}' is unknown, so no stage can take it as input")
    return g.infos[name]


def _value_infos(model: Any) -> dict[str, Any]:
    """Declared and inferred value infos by name; inference runs on a copy where the large
    initializers are graph inputs, so that a model of any size fits in one protobuf."""
    onnx = _onnx()
    g = model.graph
    declared = {i.name for i in g.input}
    small = [t for t in g.initializer if _tensor_bytes(t) <= _INLINE_BYTES]
    large = [onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
             for t in g.initializer if _tensor_bytes(t) > _INLINE_BYTES and t.name not in declared]
    light = onnx.helper.make_model(
        onnx.helper.make_graph(g.node, g.name, [*g.input, *large], g.output, small, value_info=g.value_info),
        opset_imports=model.opset_import, functions=model.functions,
    )
    light.ir_version = model.ir_version
    try:
        inferred = onnx.shape_inference.infer_shapes(light).graph.value_info
    except Exception:  # unknown operators, say: the declared infos alone then
        inferred = g.value_info
    return {v.name: v for v in (*inferred, *g.output, *g.input)}


def _has_type(info: Any) -> bool:
    kind = info.type.WhichOneof("value")
    return kind is not None and (kind != "tensor_type" or info.type.tensor_type.elem_type != 0)


def _input_spec(info: Any) -> InputSpec:
    """A graph input described as ONNX Runtime's `get_inputs()` does."""
    onnx = _onnx()
    if info.type.WhichOneof("value") != "tensor_type":
        return InputSpec(info.name, str(info.type.WhichOneof("value")), ())
    tensor = info.type.tensor_type
    type_name = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return InputSpec(info.name, f"tensor({type_name})", dims)


def _node_reads(node: Any) -> tuple[str, ...]:
    """A node's inputs and the outer-scope values its subgraphs (If, Loop, Scan) read."""
    names = [v for v in node.input if v]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            defined |= {o for n in sub.node for o in n.output}
            names += sorted({v for n in sub.node for v in _node_reads(n)} - defined)
    return tuple(dict.fromkeys(names))


def _foldable(node: Any) -> bool:
    """Whether the node's value is fixed when its inputs are: a standard, deterministic operator
    without subgraphs."""
    random = node.op_type.startswith("Random") or node.op_type == "Multinomial"
    subgraphs = any(a.HasField("g") or a.graphs for a in node.attribute)
    return node.domain in ("", "ai.onnx") and not random and not subgraphs


def _initializers(graph: Any) -> list[Any]:
    return [*graph.initializer, *(t.values for t in graph.sparse_initializer)]


def _tensor_bytes(tensor: Any) -> int:
    """Bytes of an initializer from its shape and type, without touching its data."""
    try:
        itemsize = int(_onnx().helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except Exception:  # an element type numpy has no name for
        itemsize = 1
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _constant_bytes(node: Any) -> int:
    return sum(_tensor_bytes(a.t) for a in node.attribute if a.HasField("t"))


def _shape(dims: tuple[int | str | None, ...], batch_size: int, seq_len: int) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else batch_size if i == 0 else seq_len for i, d in enumerate(dims))


def _example_inputs(specs: tuple[InputSpec, ...], batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    example = {}
    for spec in specs:
        dtype = np.dtype(ONNX_TYPES[spec.type])  # KeyError: no example input for this type
        shape = _shape(spec.shape, batch_size, seq_len)
        example[spec.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                              else np.zeros(shape, dtype))
    return example


def _estimated_bytes(g: _Graph, names: tuple[str, ...], batch_size: int, seq_len: int) -> int:
    """Bytes of values from their inferred shapes (0 for a value whose shape is unknown)."""
    total = 0
    for name in names:
        info = g.infos.get(name)
        if info is None or info.type.WhichOneof("value") != "tensor_type" or not _has_type(info):
            continue
        spec = _input_spec(info)
        dtype = ONNX_TYPES.get(spec.type)
        if dtype is not None:
            total += int(np.prod(_shape(spec.shape, batch_size, seq_len))) * np.dtype(dtype).itemsize
    return total
