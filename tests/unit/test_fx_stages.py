"""PyTorch models cut into pipeline stages through their torch.fx graph (`TracedStaged`)."""

from __future__ import annotations

import gc
import itertools
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import toy_models

from distinfer.errors import ModelError, ModelInputError
from distinfer.models import parse_model
from distinfer.models.fx_stages import TracedStaged
from distinfer.models.profile import module_bytes
from distinfer.models.torch_runner import TorchRunner

ROWS = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)


def _run_stages(staged: TracedStaged, bounds: list[int], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Every stage built in this process, each fed what the one before returned."""
    stages = [staged.build_stage(a, b, "cpu", 1) for a, b in itertools.pairwise(bounds)]
    assert [s.is_last for s in stages] == [False] * (len(stages) - 1) + [True]
    x: Any = staged.preparer("cpu").prepare({"input": rows}, 4).batches[0]
    for stage in stages[:-1]:
        x = stage(x)
        assert isinstance(x, tuple) and all(t.device.type == "cpu" for t in x)
    out = stages[-1](x)
    assert isinstance(out, dict)
    return out


def _check_chains(name: str) -> None:
    expected = TorchRunner(name).forward(torch.from_numpy(ROWS[:4]))
    staged = TracedStaged(name)
    n = len(staged.layer_names())
    for bounds in ([0, n // 2, n], [0, 1, n - 1, n]):
        got = _run_stages(staged, bounds, ROWS)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert isinstance(got[key], np.ndarray)
            torch.testing.assert_close(torch.from_numpy(got[key]), torch.from_numpy(value))


@pytest.mark.parametrize("factory", ["deep_mlp", "residual_net", "two_heads"])
def test_two_and_three_stages_equal_the_whole_model(factory: str) -> None:
    _check_chains(f"toy_models:{factory}")


def test_layer_names() -> None:
    assert TracedStaged("toy_models:deep_mlp").layer_names() == [str(i) for i in range(7)]
    # the skip inside a block makes two values cross there: a block is one layer
    assert TracedStaged("toy_models:residual_net").layer_names() == [
        "inp", "blocks.0", "blocks.1", "blocks.2", "out"
    ]
    assert TracedStaged("toy_models:two_heads").layer_names() == ["inner.0", "inner.1", "inner.2", "sum_1"]


def test_stage_keeps_only_its_own_weights() -> None:
    def linears() -> int:
        gc.collect()
        return sum(type(o) is torch.nn.Linear for o in gc.get_objects())

    before = linears()
    stage = TracedStaged("toy_models:deep_mlp").build_stage(2, 5, "cpu", 1)
    # the factory built all four Linear layers; only the stage's two are still alive
    assert linears() - before == 2
    assert {k.split(".")[0] for k, _ in stage.module.named_parameters()} == {"2", "4"}
    model = toy_models.deep_mlp()
    assert module_bytes(stage.module) == module_bytes(model[2]) + module_bytes(model[4])


def test_exported_program_cuts_too(tmp_path: Path) -> None:
    model = toy_models.deep_mlp()
    batch = torch.export.Dim("batch", min=2)
    try:
        program = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: batch},))
        path = tmp_path / "deep.pt2"
        torch.export.save(program, str(path))
    except Exception as exc:  # export support varies between torch builds
        pytest.skip(f"torch.export cannot export the toy model here: {exc}")
    staged = TracedStaged(str(path))
    assert staged.layer_names() == [str(i) for i in range(7)]
    _check_chains(str(path))
    costs = staged.layer_costs(4, 8)  # the export records the input's shape
    assert len(costs) == 7 and costs[0].activation_bytes == 4 * 32 * 4


def test_untraceable_model_is_refused_in_one_line() -> None:
    with pytest.raises(ModelError) as caught:
        TracedStaged("toy_models:data_dependent").layer_names()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot cut 'toy_models:data_dependent' into pipeline stages: torch.fx could not trace it (")
    assert message.endswith("); use --strategy data, or export it to ONNX and cut that")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, and still read
def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(toy_models.mlp()), str(path))
    spec = parse_model(str(path))
    staged = spec.family.staged(spec)
    assert isinstance(staged, TracedStaged)
    with pytest.raises(ModelError, match=r"cannot cut TorchScript model '.*mlp\.pt' into stages; save it with torch\.export"):
        staged.layer_names()


def test_layer_costs_match_layer_names() -> None:
    for name in ("toy_models:deep_mlp", "toy_models:residual_net"):
        staged = TracedStaged(name)
        costs = staged.layer_costs(4, 8)
        assert [c.name for c in costs] == staged.layer_names()
        assert all(c.seconds > 0 and c.activation_bytes > 0 for c in costs)
        assert sum(c.weight_bytes for c in costs) == module_bytes(toy_models.residual_net() if "res" in name else toy_models.deep_mlp())
    assert costs[-1].activation_bytes == 4 * 8 * 4  # the last layer's numpy outputs


def test_layer_costs_from_an_example() -> None:
    example = torch.randn(3, 16)
    costs = TracedStaged("toy_models:two_heads", example=example).layer_costs(5, 8)
    assert costs[0].activation_bytes == 5 * 32 * 4
    costs = TracedStaged("toy_models:two_heads").layer_costs_for(example)
    assert [c.name for c in costs] == ["inner.0", "inner.1", "inner.2", "sum_1"]
    assert costs[-1].activation_bytes == 3 * 8 * 4 + 3 * 4  # both outputs of the last stage


def test_preparer_is_torch_runner_prepare() -> None:
    staged, runner = TracedStaged("toy_models:mlp"), TorchRunner("toy_models:mlp")
    ours = staged.preparer("cpu")
    assert ours.input_names == runner.input_names == ("input",)
    doubles = {"input": ROWS.astype(np.float64)}
    for a, b in zip(ours.prepare(doubles, 4).batches, runner.prepare(doubles, 4).batches, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
    with pytest.raises(ModelInputError) as mine:
        ours.prepare({"input": ["text"]}, 4)
    with pytest.raises(ModelInputError) as theirs:
        runner.prepare({"input": ["text"]}, 4)
    assert str(mine.value) == str(theirs.value)


def test_description_pickles_without_weights() -> None:
    staged = TracedStaged("toy_models:deep_mlp")
    staged.layer_names()
    copy = pickle.loads(pickle.dumps(staged))
    assert len(pickle.dumps(staged)) < 2000
    assert copy.layer_names() == staged.layer_names()
