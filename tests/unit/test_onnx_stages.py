"""ONNX models cut into pipeline stages: chained stages equal the whole model, stage files hold
only their own weights, and the layer analysis on small hand-made graphs."""

from __future__ import annotations

import itertools
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from distinfer import ModelError, ModelInputError
from distinfer.models import parse_model
from distinfer.models.onnx_runner import OnnxRunner
from distinfer.models.onnx_stages import OnnxStage, OnnxStaged
from distinfer.planning.onnx_graph import GraphCuts, GraphNode


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(48, 48), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LateInput(nn.Module):
    """`y` is read by the last node only, so every stage before it passes `y` along."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(8, 8), nn.ReLU())])
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) * y


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).masked_fill(mask[:, None, :], -1e9)
        x = x + self.proj(scores.softmax(-1) @ v)
        return x + self.ff(self.n2(x))


class Encoder(nn.Module):
    """Three blocks that all read the padding mask, then a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(16) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x)


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path,
            seq: bool = False) -> Path:
    axes = {n: ({0: "n", 1: "s"} if seq else {0: "n"}) for n in [*names, "out"]}
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), example, str(path), input_names=names, output_names=["out"],
                      dynamic_axes=axes, dynamo=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    d = tmp_path_factory.mktemp("onnx-stages")
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    mask = rng.integers(1, 8, 5)[:, None] <= np.arange(7)[None, :]  # True: padding
    return {
        "mlp": (_export(MLP(), (torch.randn(2, 48),), ["x"], d / "mlp.onnx"),
                {"x": rng.standard_normal((5, 48)).astype(np.float32)}),
        "late": (_export(LateInput(), (torch.randn(2, 8), torch.randn(2, 8)), ["x", "y"], d / "late.onnx"),
                 {"x": rng.standard_normal((5, 8)), "y": rng.standard_normal((5, 8)).astype(np.float32)}),
        "encoder": (_export(Encoder(), (torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)),
                            ["x", "mask"], d / "encoder.onnx", seq=True),
                    {"x": rng.standard_normal((5, 7, 16)).astype(np.float32), "mask": mask}),
    }


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path / "distinfer-onnx-stages"


def _split(layers: int, k: int) -> tuple[tuple[int, int], ...]:
    ends = [round(i * layers / k) for i in range(k + 1)]
    return tuple(itertools.pairwise(ends))


def _chain(stages: list[OnnxStage], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = batch
    for stage in stages:
        x = stage(x)
    return x


@pytest.mark.parametrize("name", ["mlp", "late", "encoder"])
@pytest.mark.parametrize("k", [2, 3])
def test_chained_stages_equal_the_whole_model(models: dict[str, tuple[Path, dict[str, np.ndarray]]],
                                              name: str, k: int, cache_dir: Path) -> None:
    path, inputs = models[name]
    staged = OnnxStaged(str(path))
    layers = staged.layer_names()
    assert len(layers) >= 3
    plan = _split(len(layers), k)
    staged.prepare_stages(plan)
    stages = [staged.build_stage(a, b, "cpu", 1) for a, b in plan]
    assert [s.is_last for s in stages] == [False] * (k - 1) + [True]
    runner = OnnxRunner(path, threads=1)
    ours, theirs = staged.preparer("cpu").prepare(inputs, 2), runner.prepare(inputs, 2)
    assert staged.preparer("cpu").input_names == runner.input_names
    assert len(ours.batches) == len(theirs.batches) == 3
    for mine, reference in zip(ours.batches, theirs.batches, strict=True):
        out, want = _chain(stages, mine), runner.forward(reference)
        assert list(out) == list(want) == ["out"]
        torch.testing.assert_close(out["out"], want["out"])
    # each stage file holds only the weights its nodes read
    files = [cache_dir / next(cache_dir.iterdir()).name / f"layers-{a}-{b}.onnx" for a, b in plan]
    whole = onnx.load(str(path))
    seen: set[str] = set()
    for f in files:
        graph = onnx.load(str(f)).graph
        names = {t.name for t in graph.initializer}
        read = {v for n in graph.node for v in n.input}
        assert names == read & {t.name for t in whole.graph.initializer}
        assert len(names) < len(whole.graph.initializer)
        seen |= names
    assert seen == {t.name for t in whole.graph.initializer}
    if name == "mlp":  # no shared weights, and weights dominate its files
        assert all(f.stat().st_size < path.stat().st_size for f in files)
        assert sum(f.stat().st_size for f in files) == pytest.approx(path.stat().st_size, rel=0.1)


def test_inputs_read_late_pass_through_earlier_stages(models: dict[str, tuple[Path, dict[str, np.ndarray]]]) -> None:
    staged = OnnxStaged(str(models["late"][0]))
    n = len(staged.layer_names())
    plan = ((0, 1), (1, n - 1), (n - 1, n))
    staged.prepare_stages(plan)
    first, middle, last = (staged.build_stage(a, b, "cpu", 1) for a, b in plan)
    assert first.reads == ("x",) and middle.reads != () and "y" not in middle.reads
    assert "y" in first.returns and "y" in middle.returns and "y" in last.reads
    assert last.returns == ("out",)


def test_mask_reaches_every_block(models: dict[str, tuple[Path, dict[str, np.ndarray]]]) -> None:
    path, inputs = models["encoder"]
    staged = OnnxStaged(str(path))
    n = len(staged.layer_names())
    plan = ((0, 1), (1, 2), (2, n))  # block 0 attention | block 0 feed-forward | the rest
    staged.prepare_stages(plan)
    stages = [staged.build_stage(a, b, "cpu", 1) for a, b in plan]
    # the mask (as the exporter reshaped it once for all blocks) goes through stage 1 untouched
    passed = set(stages[1].returns) - set(stages[1].makes)
    assert "mask" in stages[0].reads and passed and passed <= set(stages[2].reads) - set(stages[1].reads)
    batch = staged.preparer("cpu").prepare(inputs, 5).batches[0]
    torch.testing.assert_close(_chain(stages, batch)["out"], OnnxRunner(path, threads=1).forward(batch)["out"])


def test_sizes_and_costs_agree(models: dict[str, tuple[Path, dict[str, np.ndarray]]]) -> None:
    for path, _ in models.values():
        staged = OnnxStaged(str(path))
        names, weights = staged.layer_names(), staged.weight_bytes()
        costs = staged.layer_costs(2, 6)
        assert len(names) == len(weights) == len(costs) and len(set(names)) == len(names)
        assert [c.name for c in costs] == names and [c.weight_bytes for c in costs] == weights
        assert all(c.seconds > 0 and c.activation_bytes > 0 for c in costs)
        total = sum(4 * int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
        assert sum(weights) >= total  # shared weights count in every layer that reads them
        if path.name == "mlp.onnx":
            assert sum(weights) == total


def test_stage_processes_read_only_their_file(models: dict[str, tuple[Path, dict[str, np.ndarray]]]) -> None:
    path = models["mlp"][0]
    OnnxStaged(str(path)).prepare_stages(((0, 3), (3, 8)))
    fresh = OnnxStaged(str(path))  # what a stage process makes
    preparer, stage = fresh.preparer("cpu"), fresh.build_stage(3, 8, "cpu", 1)
    assert fresh._graph is None and stage.is_last
    with pytest.raises(ModelInputError, match=r"'x' expects shape \[N, 48\] .* shape \[5\]"):
        preparer.prepare({"x": np.zeros((2, 5))}, 8)
    with pytest.raises(ModelInputError, match="holds text"):
        preparer.prepare({"x": ["a", "b"]}, 8)
    assert pickle.loads(pickle.dumps(OnnxStaged(str(path))))._graph is None


def test_a_stage_without_the_drivers_files_extracts_its_own(models: dict[str, tuple[Path, dict[str, np.ndarray]]],
                                                           cache_dir: Path) -> None:
    path, inputs = models["mlp"]
    staged = OnnxStaged(str(path))
    stages = [staged.build_stage(0, 5, "cpu", 1), staged.build_stage(5, 8, "cpu", 1)]
    assert len(list(next(cache_dir.iterdir()).glob("*.onnx"))) == 2
    batch = staged.preparer("cpu").prepare(inputs, 5).batches[0]
    torch.testing.assert_close(_chain(stages, batch)["out"], OnnxRunner(path, threads=1).forward(batch)["out"])


def test_too_many_stages_are_refused(models: dict[str, tuple[Path, dict[str, np.ndarray]]]) -> None:
    spec = parse_model(str(models["late"][0]))
    staged = spec.family.staged(spec)
    assert isinstance(staged, OnnxStaged)
    n = len(staged.layer_names())
    with pytest.raises(ModelError, match=rf"has {n} layers .* too few for {n + 1} stages"):
        staged.prepare_stages(tuple((i, i + 1) for i in range(n + 1)))
    with pytest.raises(ModelError, match="do not cover"):
        staged.prepare_stages(((0, 2), (3, n)))


def _save(tmp_path: Path, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          inits: list[onnx.TensorProto] | None = None) -> Path:
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out], inits or []),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def test_one_node_is_one_layer_and_uncommon_inputs_fall_back_to_weight_costs(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT16, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    single = OnnxStaged(str(_save(tmp_path, [helper.make_node("Cast", ["x"], ["out"], to=1)], [x])))
    assert single.layer_names() == ["node 0 (Cast)"]
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=1), helper.make_node("Add", ["c", "w"], ["out"])]
    staged = OnnxStaged(str(_save(tmp_path, nodes, [x], [w])))
    costs = staged.layer_costs(3, 5)  # no example input for int16: costs follow the weights
    assert [c.weight_bytes for c in costs] == [0, 16] and costs[1].seconds > costs[0].seconds > 0
    assert [c.activation_bytes for c in costs] == [48, 48]


def test_graph_cuts_on_hand_made_graphs() -> None:
    # a -> 4 nodes; the mask m is read by nodes 1 and 3; given out of order; k is a fixed value
    nodes = [GraphNode("B", ("h1", "m", "k"), ("h2",)), GraphNode("A", ("a",), ("h1",)),
             GraphNode("D", ("h3", "m"), ("out",)), GraphNode("C", ("h2",), ("h3",)),
             GraphNode("Identity", ("w",), ("k",)), GraphNode("Dead", ("a",), ("unused",))]
    cuts = GraphCuts(nodes, ["a", "m"], ["out"], {"w"})
    assert cuts.names == ["node 0 (A)", "node 1 (B)", "node 2 (C)", "node 3 (D)"]
    piece = cuts.piece(1, 3)
    assert [nodes[i].op for i in piece.nodes] == ["Identity", "B", "C"]
    assert piece.inputs == ("m", "h1") and piece.outputs == ("h3",) and piece.returns == ("m", "h3")
    assert "w" in piece.reads
    # a value of unknown type never crosses a cut
    assert GraphCuts(nodes, ["a", "m"], ["out"], {"w"}, typed={"a", "m", "h1", "h3"}).names == [
        "node 0 (A)", "nodes 1-2 (B..C)", "node 3 (D)"]
    # boundaries where the fewest values cross win, unless a layer would hold over half the nodes
    def masked(blocks: int) -> list[GraphNode]:  # blocks read (v, m), then two nodes read v alone
        chain = [GraphNode("N", (f"v{i}", "m"), (f"v{i + 1}",)) for i in range(blocks)]
        return [*chain, GraphNode("T", (f"v{blocks}",), ("t",)), GraphNode("T", ("t",), ("out",))]

    assert GraphCuts(masked(2), ["v0", "m"], ["out"], ()).names == ["nodes 0-1 (N..N)", "node 2 (T)", "node 3 (T)"]
    assert len(GraphCuts(masked(6), ["v0", "m"], ["out"], ()).names) == 8  # 6 of 8 nodes in one: relaxed
    cycle = [GraphNode("A", ("b",), ("a",)), GraphNode("B", ("a",), ("b",))]
    with pytest.raises(ModelError, match="cycle"):
        GraphCuts(cycle, [], ["b"], ())
