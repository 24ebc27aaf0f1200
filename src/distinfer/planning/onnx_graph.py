"""Where a dataflow graph (an ONNX model) may be cut into pipeline stages, as pure Python.

A graph is a list of `GraphNode`s reading and writing named values. The nodes are put in
topological order (kept as given when it already is one) and nodes nothing needs are dropped.
Nodes whose value is fixed in the graph (Constant nodes, and nodes reading only initializers and
fixed values, such as the Identity an exporter puts on a shared weight or a Cast of stored
half-precision weights) are set apart: like initializers they are copied into every piece that
reads them, so they never cross a cut.

Between the i-th and the next compute node lies a boundary; the values that *cross* it are
those made before it (the graph inputs count as made before node 0) and read at or after it,
or graph outputs made before it. A cut where few values cross is cheap to send and simple to
wire, so the boundaries where the fewest values cross are the candidates, and the runs of nodes
between consecutive candidates are the model's layers. When that leaves a layer holding more
than half of the nodes (a graph whose few cheapest boundaries sit in its head, say) the count
allowed is raised by one, at most `RELAX` times, so that a transformer whose blocks pass
(hidden, mask) still splits between blocks. Sizes are left to the planner, which sees each
layer's output bytes and prefers, among equally fast plans, the one sending the fewest bytes.
Boundaries crossed by a value of unknown type are never candidates: a stage's inputs must be
declared with a type.

`GraphCuts.piece(start, stop)` then says what a stage holding layers [start, stop) runs,
reads, computes and hands on; values it only passes along (a mask every block reads, an input
only the last layers read) are handed on without entering its subgraph.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from distinfer.errors import ModelError

__all__ = ["RELAX", "GraphCuts", "GraphNode", "Piece"]

RELAX = 2  # at most this many more crossing values than the fewest, when layers come out lopsided


@dataclass(frozen=True, slots=True)
class GraphNode:
    op: str
    inputs: tuple[str, ...]  # every value read, subgraphs' outer-scope reads included
    outputs: tuple[str, ...]
    foldable: bool = True  # its value is fixed when all it reads is (not so for random draws)


@dataclass(frozen=True, slots=True)
class Piece:
    """What a stage holding a range of layers runs, and what it exchanges with its neighbours."""

    nodes: tuple[int, ...]  # indices into the graph's node list, in run order (constants first)
    inputs: tuple[str, ...]  # values its subgraph reads from the stage before (or the model inputs)
    outputs: tuple[str, ...]  # values its subgraph makes that later stages or the model outputs need
    returns: tuple[str, ...]  # all it hands on, passed-along values too; the last: the model outputs
    reads: frozenset[str]  # every name its nodes read, and the model outputs for the last piece


class GraphCuts:
    """The layers of a graph (see the module docstring).

    `static` names the values that are fixed in the graph (initializers); `typed` the values
    whose element type is known, or None when all are.
    """

    def __init__(
        self,
        nodes: Sequence[GraphNode],
        inputs: Sequence[str],
        outputs: Sequence[str],
        static: Collection[str],
        typed: Collection[str] | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.graph_outputs = tuple(dict.fromkeys(outputs))
        kept = _prune(self.nodes, _topological(self.nodes), self.graph_outputs)
        fixed = set(static)
        self.constants: list[int] = []  # fixed-value nodes, copied into every piece that reads them
        self.compute: list[int] = []
        for i in kept:
            node = self.nodes[i]
            if node.foldable and fixed.issuperset(node.inputs):
                self.constants.append(i)
                fixed.update(node.outputs)
            else:
                self.compute.append(i)
        self.static = frozenset(fixed)
        n = len(self.compute)
        # made[v]: the position of v's producer (-1: a graph input); last[v]: where it is last read
        self.made: dict[str, int] = {v: -1 for v in inputs if v not in fixed}
        for pos, i in enumerate(self.compute):
            self.made.update((o, pos) for o in self.nodes[i].outputs if o)
        self.last: dict[str, int] = {}
        for pos, i in enumerate(self.compute):
            self.last.update((v, pos) for v in self.nodes[i].inputs if v in self.made)
        self.last.update((v, n) for v in self.graph_outputs if v in self.made)
        self.bounds = self._boundaries(n, typed)
        self.names = [self._name(a, b) for a, b in itertools.pairwise(self.bounds)]

    def _boundaries(self, n: int, typed: Collection[str] | None) -> list[int]:
        count = [0] * (n + 2)
        blocked = [0] * (n + 2)
        for v, made in self.made.items():
            last = self.last.get(v, made)
            if last > made:  # crosses the boundaries made+1 .. last
                count[made + 1] += 1
                count[last + 1] -= 1
                if typed is not None and v not in typed:
                    blocked[made + 1] += 1
                    blocked[last + 1] -= 1
        for b in range(1, n + 2):
            count[b] += count[b - 1]
            blocked[b] += blocked[b - 1]
        interior = [b for b in range(1, n) if not blocked[b]]
        if not interior:
            return [0, n]
        allowed = min(count[b] for b in interior)
        for _ in range(RELAX + 1):
            bounds = [0, *(b for b in interior if count[b] <= allowed), n]
            if 2 * max(b - a for a, b in itertools.pairwise(bounds)) <= n:
                break
            allowed += 1
        return bounds

    def _name(self, a: int, b: int) -> str:
        if a == b:
            return "no compute nodes"
        first, last = self.nodes[self.compute[a]].op, self.nodes[self.compute[b - 1]].op
        return f"node {a} ({first})" if b - a == 1 else f"nodes {a}-{b - 1} ({first}..{last})"

    def crossing(self, boundary: int) -> tuple[str, ...]:
        """The values crossing a node boundary (0: the graph inputs read; the end: the outputs)."""
        if boundary >= len(self.compute):
            return self.graph_outputs
        return tuple(v for v, made in self.made.items() if made < boundary <= self.last.get(v, made))

    def piece(self, start: int, stop: int) -> Piece:
        """Layers [start, stop) as one stage."""
        if not 0 <= start < stop <= len(self.names):
            raise ModelError(f"layers [{start}, {stop}) are not a range of the {len(self.names)} layers")
        a, b = self.bounds[start], self.bounds[stop]
        compute = self.compute[a:b]
        returns = self.crossing(b)
        reads = {v for i in compute for v in self.nodes[i].inputs}
        if stop == len(self.names):
            reads.update(returns)
        constants: list[int] = []
        for i in reversed(self.constants):  # and the fixed values those read, and so on
            if reads.intersection(self.nodes[i].outputs):
                constants.insert(0, i)
                reads.update(self.nodes[i].inputs)
        made = {o for i in compute for o in self.nodes[i].outputs}
        return Piece(
            nodes=(*constants, *compute),
            inputs=tuple(v for v in self.crossing(a) if v in reads),
            outputs=tuple(v for v in returns if v in made or v in self.static),
            returns=returns,
            reads=frozenset(reads),
        )


def _topological(nodes: Sequence[GraphNode]) -> list[int]:
    """Node indices in an order where every value is made before it is read; the given order
    when it is one, else the earliest ready node first."""
    producer = {o: i for i, node in enumerate(nodes) for o in node.outputs if o}
    deps = [{producer[v] for v in node.inputs if producer.get(v, i) != i} for i, node in enumerate(nodes)]
    if all(d < i for i, ds in enumerate(deps) for d in ds):
        return list(range(len(nodes)))
    readers: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            readers[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(nodes):
        raise ModelError("the ONNX graph has a cycle; it cannot be cut into stages")
    return order


def _prune(nodes: Sequence[GraphNode], order: list[int], outputs: Sequence[str]) -> list[int]:
    """`order` without the nodes whose values no graph output depends on."""
    needed = set(outputs)
    kept: list[int] = []
    for i in reversed(order):
        if needed.intersection(nodes[i].outputs):
            kept.append(i)
            needed.update(nodes[i].inputs)
    return kept[::-1]
