"""Any traceable PyTorch model as pipeline stages: a `package.module:factory` or a `.pt2` file.

Approach
--------
The model is turned into a torch.fx graph: `torch.fx.symbolic_trace` for a factory's module
(already in eval mode, and with its optional `forward` arguments fixed at their defaults),
`torch.export.load(path).module()` for an exported program, which is a graph already.

Layers. The graph's compute nodes run in order. Between two of them, the values that cross
the boundary are those made before it and used after it (the model's input counts while it
is still used; parameters and constants do not, since every stage fetches its own). A
boundary is a cut point when the fewest values cross it: one, in a chain like a
`nn.Sequential`, so a cut never falls inside a residual block, whose skip makes two values
cross. A boundary right after a node nothing uses (a guard, an in-place op) is not a cut
point, so such a node stays with what follows. The runs of nodes between cut points are the
layers, named after the modules they run ("0", "blocks.1", "0..2").

Stages. Layers [start, stop) become a graph of their own: a placeholder for each value
crossing into `start`, copies of their nodes, and as output the values crossing out of
`stop`, or the model's own output for the last stage. `GraphModule(root, graph)` keeps only
the submodules and parameters that graph uses, so once the whole model is dropped a stage
process holds its own weights only. Values travel between stages as tuples of CPU tensors;
the last stage names its outputs as `TorchRunner` does.

A factory builds the whole model, and every stage process calls it: its peak memory is the
whole model's, however little it keeps. A `.pt2` file is read whole for the same reason.
TorchScript cannot be cut this way and is refused.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ..errors import ModelError
from .base import Batches, Column
from .staged import StagedModel
from .torch_runner import float_dtype, is_torchscript, load_module, name_outputs, prepare_batches

if TYPE_CHECKING:
    from ..planning.cuts import LayerCost

__all__ = ["TracedStaged"]

_FREE = ("get_attr", "placeholder")  # values every stage makes for itself


def _trace(name: str) -> tuple[fx.GraphModule, torch.dtype]:
    """The model as a graph, on the CPU, and the dtype its float inputs are cast to."""
    if is_torchscript(name):
        raise ModelError(
            f"cannot cut TorchScript model '{name}' into stages; save it with torch.export (.pt2) "
            "or give a package.module:factory, or use --strategy data"
        )
    module = load_module(name, torch.device("cpu"))
    if isinstance(module, fx.GraphModule):
        return module, float_dtype(module)
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        return fx.symbolic_trace(module, concrete_args=fixed or None), float_dtype(module)
    except Exception as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelError(
            f"cannot cut '{name}' into pipeline stages: torch.fx could not trace it ({first}); "
            "use --strategy data, or export it to ONNX and cut that"
        ) from None


def _owner(node: fx.Node) -> str:
    """The qualified name of the module a node belongs to, else the node's own name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = str(list(stack.values())[-1][0])
        if path:
            return path
    return node.name


def _segment_name(nodes: list[fx.Node]) -> str:
    named = [n for n in nodes if n.users] or nodes  # not after a guard or an assert
    owners = list(dict.fromkeys(_owner(n) for n in named))
    if len(owners) == 1:
        return owners[0]
    # the nodes of one module and of its children (a residual block and its add) take its name
    paths = zip(*(o.split(".") for o in owners), strict=False)
    common = ".".join(p[0] for p in itertools.takewhile(lambda p: len(set(p)) == 1, paths))
    return common if common in owners else f"{owners[0]}..{owners[-1]}"


@dataclasses.dataclass
class _Graph:
    """A traced model cut into layers: `bounds[i]` is the index in `compute` where layer i
    starts (and `bounds[-1] == len(compute)`); `crossing[b]` the values entering index b."""

    name: str
    gm: fx.GraphModule
    source: fx.Node
    compute: list[fx.Node]
    bounds: list[int]
    crossing: dict[int, list[fx.Node]]

    @classmethod
    def of(cls, name: str, gm: fx.GraphModule) -> _Graph:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        compute = [n for n in gm.graph.nodes if n.op not in (*_FREE, "output")]
        if not placeholders or not compute:
            raise ModelError(f"cannot cut '{name}' into pipeline stages: its graph has no layers")
        for extra in placeholders[1:]:
            if extra.users and not extra.args:
                raise ModelError(
                    f"cannot cut '{name}' into pipeline stages: it takes more than one input "
                    f"('{extra.name}'); use --strategy data"
                )
        source = placeholders[0]
        position = {n: i for i, n in enumerate(compute)}
        position[source] = -1
        end = len(compute)  # the output node's position
        last_use = {
            n: max(position.get(u, end) for u in n.users) for n in (source, *compute) if n.users
        }
        counts: dict[int, list[fx.Node]] = {}
        alive = [source] if source in last_use else []
        for b in range(1, end):
            made = compute[b - 1]
            alive = [n for n in (*alive, made) if last_use.get(n, -1) >= b]
            if made.users:  # a node nothing uses stays with what follows
                counts[b] = alive
        fewest = max(1, min((len(v) for v in counts.values()), default=1))
        cuts = [b for b, values in counts.items() if len(values) <= fewest]
        crossing = {b: counts[b] for b in cuts}
        crossing[0] = [source]
        return cls(name, gm, source, compute, [0, *cuts, end], crossing)

    def layer_names(self) -> list[str]:
        return [_segment_name(self.compute[a:b]) for a, b in itertools.pairwise(self.bounds)]

    def carve(self, start: int, stop: int) -> fx.GraphModule:
        """Layers [start, stop) as a module of their own (see the module docstring)."""
        if not 0 <= start < stop <= len(self.bounds) - 1:
            raise ModelError(f"'{self.name}' has {len(self.bounds) - 1} layers; no stage [{start}, {stop})")
        first, last = self.bounds[start], self.bounds[stop]
        graph = fx.Graph()
        env: dict[fx.Node, Any] = {n: graph.placeholder(n.name) for n in self.crossing[first]}

        def value(node: fx.Node) -> Any:
            if node in env:
                return env[node]
            if node.op == "get_attr":  # a parameter or a constant: each stage fetches its own
                env[node] = graph.node_copy(node)
            else:  # an optional input, at its default
                env[node] = node.args[0] if node.args else None
            return env[node]

        for node in self.compute[first:last]:
            env[node] = graph.node_copy(node, value)
        if last == len(self.compute):
            output = next(n for n in self.gm.graph.nodes if n.op == "output")
            graph.output(fx.map_arg(output.args[0], value))
        else:
            graph.output(tuple(value(n) for n in self.crossing[last]))
        return fx.GraphModule(self.gm, graph)

    def stage(self, start: int, stop: int, device: str) -> _TracedStage:
        # an exported program's graph returns its outputs flat, and its code nests them again
        codegen = self.gm.graph._codegen
        pytree = codegen.pytree_info if isinstance(codegen, fx.graph._PyTreeCodeGen) else None
        last = stop == len(self.bounds) - 1
        return _TracedStage(self.carve(start, stop), device, start == 0, last, pytree and pytree.out_spec)

    def example(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """A micro-batch for measuring, if the model's first layer or export tells its shape."""
        generator = torch.Generator().manual_seed(0)
        fake = self.source.meta.get("val")
        if isinstance(fake, torch.Tensor):  # an exported program records its input
            dims = enumerate(fake.shape)  # symbolic sizes: the batch first, then the sequence
            shape = [d if isinstance(d, int) else batch_size if i == 0 else seq_len for i, d in dims]
            if fake.is_floating_point():
                return torch.randn(shape, generator=generator).to(fake.dtype)
            return torch.zeros(shape, dtype=fake.dtype)
        readers = [u for u in self.compute if self.source in u.all_input_nodes]  # `x.size(0)` aside
        first = next((u for u in readers if u.op == "call_module"), readers[0] if readers else None)
        module = None
        if first is not None and first.op == "call_module":
            module = self.gm.get_submodule(str(first.target))
        if isinstance(module, torch.nn.Linear):
            dtype = module.weight.dtype
            return torch.randn(batch_size, module.in_features, generator=generator).to(dtype)
        if isinstance(module, torch.nn.Embedding):
            return torch.randint(0, module.num_embeddings, (batch_size, seq_len), generator=generator)
        what = type(module).__name__ if module is not None else first.name if first is not None else "nothing"
        raise ModelError(
            f"cannot measure the layers of '{self.name}': its input shape is unknown (its first layer "
            f"is {what}); give explicit --cuts to place the stages"
        )


class _TracedStage:
    """Layers [start, stop) of a traced model on `device`; see `StagedModel.build_stage`."""

    def __init__(self, module: fx.GraphModule, device: str, first: bool, last: bool, out_spec: Any) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.is_first, self.is_last, self.out_spec = first, last, out_spec

    def __call__(self, x: Any) -> Any:
        args = (x,) if self.is_first else tuple(x)
        args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
        with torch.inference_mode():
            out = self.module(*args)
        if self.is_last:
            if self.out_spec is not None:
                out = torch.utils._pytree.tree_unflatten(list(out), self.out_spec)
            return name_outputs(out)
        return tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in out)


class _Preparer:
    """The first stage's input side: exactly `TorchRunner.prepare`."""

    input_names: tuple[str, ...] = ("input",)

    def __init__(self, staged: TracedStaged) -> None:
        self.staged = staged

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return prepare_batches(self.staged.name, self.staged.float_dtype(), inputs, batch_size)


class TracedStaged(StagedModel):
    """A PyTorch model cut through its torch.fx graph (see the module docstring).

    `example`, when given, is the input `layer_costs` measures on (its rows repeated or cut to
    the batch size); without it the input's shape comes from an export or the first layer.
    """

    def __init__(self, name: str, example: torch.Tensor | None = None) -> None:
        self.name = name
        self.example = example
        self._names: list[str] | None = None
        self._dtype: torch.dtype | None = None

    def _graph(self) -> _Graph:
        """The model built and traced (in full); its layer names and input dtype are kept."""
        gm, self._dtype = _trace(self.name)
        graph = _Graph.of(self.name, gm)
        self._names = graph.layer_names()
        return graph

    def float_dtype(self) -> torch.dtype:
        """The dtype float inputs are cast to (the first parameter's, as `TorchRunner`)."""
        if self._dtype is None:
            self._graph()
        assert self._dtype is not None
        return self._dtype

    def layer_names(self) -> list[str]:
        return list(self._names if self._names is not None else self._graph().layer_names())

    def layer_costs(self, batch_size: int, seq_len: int) -> list[LayerCost]:
        graph = self._graph()
        if self.example is None:
            return self._measure(graph, graph.example(batch_size, seq_len))
        rows = -(-batch_size // len(self.example))
        return self._measure(graph, torch.cat([self.example] * rows)[:batch_size])

    def layer_costs_for(self, example: torch.Tensor) -> list[LayerCost]:
        """Each layer's cost on `example`: one micro-batch, as `TorchRunner.prepare` makes it."""
        return self._measure(self._graph(), example)

    def _measure(self, graph: _Graph, example: torch.Tensor) -> list[LayerCost]:
        from .profile import module_bytes, profile_layers

        layers = [graph.stage(i, i + 1, "cpu") for i in range(len(graph.bounds) - 1)]
        costs = profile_layers(layers, example, graph.layer_names())
        # weights: what each layer's own module holds (the stage wrapper itself has none)
        pairs = zip(costs, layers, strict=True)
        return [dataclasses.replace(c, weight_bytes=module_bytes(s.module)) for c, s in pairs]

    def preparer(self, device: str) -> _Preparer:
        return _Preparer(self)

    def build_stage(self, start: int, stop: int, device: str, threads: int) -> _TracedStage:
        """Layers [start, stop) alone. The factory (or the `.pt2` file) still builds the whole
        model first, which cannot be avoided; everything outside the stage is then freed."""
        graph = self._graph()
        stage = graph.stage(start, stop, device)
        del graph
        gc.collect()
        return stage
