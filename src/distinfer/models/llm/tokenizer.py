"""The tokenizer of a generation model: ids exactly as transformers gives them, loaded in about a second.

A model's tokenizer comes from a GGUF file (its vocabulary is metadata, which transformers turns into
a `tokenizers` pipeline in a minute or so for a 262k-token vocabulary) or from a Hugging Face
directory with `tokenizer.json`. Either way transformers builds it once, the way
`AutoTokenizer.from_pretrained` does, and what it built is kept in the model's cache entry
(`files.entry_dir`) as `tokenizer.json` plus `tokenizer_meta.json` (special ids, chat template,
decoding flags). Every later load reads those two files with `tokenizers` alone: transformers is
imported only by that one-time conversion.

    tok = load_tokenizer(Path("gemma-3-270m-q4_k_m.gguf"))
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    decoder = IncrementalDecoder(tok)
    text = "".join(decoder.push(i) for i in generated) + decoder.flush()
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from distinfer.errors import ModelError, ModelInputError
from distinfer.models.llm.files import entry_dir, write_atomically

if TYPE_CHECKING:
    import jinja2

__all__ = [
    "GEMMA3_CHAT_TEMPLATE",
    "IncrementalDecoder",
    "LlmTokenizer",
    "load_tokenizer",
]

#: version of what `tokenizer_meta.json` holds; an entry of another version is converted again
_FORMAT = 1
_TOKENIZER_FILE = "tokenizer.json"
_META_FILE = "tokenizer_meta.json"

#: Gemma 3's chat template, as in the `tokenizer_config.json` of google/gemma-3-*-it; used for a
#: Gemma 3 file that carries none (GGUF files often do not). A system message is merged into the
#: first user turn; "assistant" is spelled "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

#: architectures whose file may lack a chat template, and the one to use then
_DEFAULT_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE, "gemma3_text": GEMMA3_CHAT_TEMPLATE}
#: architectures whose turns end with `<end_of_turn>`, which then also ends generation
_END_OF_TURN_ARCHS = ("gemma",)
#: GGUF keys (llama.cpp) of further ids that end generation
_GGUF_EOG_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_NO_TEMPLATE = "the model file has no chat template; give 'prompt' instead of 'messages'"


class LlmTokenizer:
    """Text to ids and back, chat rendering, and the bytes of each token.

    Built by `load_tokenizer`; `encode`/`decode` give what transformers' tokenizer for the same
    file gives (`tok(text)["input_ids"]`, `tok.decode(ids)`), `encode_chat` what its
    `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` gives.
    """

    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int | None
    unk_id: int | None
    vocab_size: int
    chat_template: str | None

    def __init__(self, backend: Tokenizer, meta: dict[str, Any]) -> None:
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._meta = meta
        self.bos_id = meta["bos_id"]
        self.eos_ids = tuple(meta["eos_ids"])
        self.pad_id = meta["pad_id"]
        self.unk_id = meta["unk_id"]
        self.add_bos: bool = bool(meta["add_bos"])
        self.architecture: str | None = meta["architecture"]
        self.chat_template = meta["chat_template"]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_tokens: dict[str, str] = dict(meta["special_tokens"])
        self._clean_up = bool(meta["clean_up_tokenization_spaces"])
        self._byte_level = bool(meta["byte_level"])
        self._byte_fallback = bool(meta["byte_fallback"])
        self._metaspace = bool(meta["metaspace"])
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._byte_decoder: dict[str, int] | None = None
        self._token_bytes: dict[int, bytes] = {}
        self._template: jinja2.Template | None = None

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`, with the BOS (or whatever the file's tokenizer adds) when
        `add_special_tokens`; special-token text like "<start_of_turn>" becomes its one id."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled as in the vocabulary (e.g. "<end_of_turn>"), None if absent."""
        found: int | None = self._backend.token_to_id(token)
        return found

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for: SentencePiece's "▁" as a space, a byte-fallback
        token `<0xNN>` as that byte, a byte-level BPE token as its bytes, an added or special token
        as its text. Unlike `decode`, nothing is stripped or skipped."""
        found = self._token_bytes.get(token_id)
        if found is not None:
            return found
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        added = self._added.get(token_id)
        token: str | None = added if added is not None else self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if added is not None:
            data = added.encode("utf-8")
        elif self._byte_level:
            if self._byte_decoder is None:
                self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
            table = self._byte_decoder
            data = b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in token)
        elif self._byte_fallback and (match := _BYTE_TOKEN.fullmatch(token)):
            data = bytes([int(match.group(1), 16)])
        else:
            data = (token.replace("\u2581", " ") if self._metaspace else token).encode("utf-8")
        self._token_bytes[token_id] = data
        return data

    # -- chat ---------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered as text by the model's Jinja template (as transformers renders it).

        ValueError for an empty list or a malformed message, or one the template rejects (e.g. roles
        that do not alternate); ModelInputError when the model has no chat template."""
        chat = _checked_messages(messages)
        template = self._compiled_template()
        import jinja2

        try:
            rendered: str = template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template rejects these messages: {exc}") from exc
        return rendered

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The ids of the rendered chat. Like transformers' `apply_chat_template(tokenize=True)`, the
        rendered text is encoded with no special tokens added: the template writes the BOS itself
        (Gemma's starts with `{{ bos_token }}`), so there is no second one."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )

    def _compiled_template(self) -> jinja2.Template:
        if self._template is None:
            if self.chat_template is None:
                raise ModelInputError(_NO_TEMPLATE)
            self._template = _compile_template(self.chat_template)
        return self._template

    def __repr__(self) -> str:
        return (
            f"LlmTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


class IncrementalDecoder:
    """Text as generated tokens arrive, in pieces whose concatenation is `decode(all ids)`.

    Each `push` decodes only a short window: the tokens of the last piece given out (the prefix,
    context for decoders that treat a sequence's first token specially) and the tokens since, and
    gives out what the window adds beyond the prefix once it does not end in an unfinished UTF-8
    character (U+FFFD). This is the prefix_offset/read_offset method of text-generation-inference
    and vLLM: constant work per token, however long the sequence.
    """

    def __init__(self, tokenizer: LlmTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # end of what has been given out

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is still unfinished)."""
        self._ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """What is left at the end of the sequence (unfinished bytes as U+FFFD, like `decode`)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        ids, decode = self._ids, self._tokenizer.decode
        prefix_text = decode(ids[self._prefix : self._read], self._skip)
        while not prefix_text and self._prefix > 0:
            # The prefix decodes to nothing on its own (skipped special tokens, or a lone "▁" whose
            # space a decoder strips at a sequence's start): widen it, or the first new token would
            # lose its leading space here while keeping it in `decode(all ids)`.
            self._prefix -= 1
            prefix_text = decode(ids[self._prefix : self._read], self._skip)
        text = decode(ids[self._prefix :], self._skip)
        if len(text) > len(prefix_text) and (final or not text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(ids)
            return text[len(prefix_text) :]
        return ""


def load_tokenizer(source: Path) -> LlmTokenizer:
    """The tokenizer of the model at `source`: a `.gguf` file, or a Hugging Face directory with
    `tokenizer.json`. Converted by transformers on first use, then read from the cache."""
    source = Path(source)
    convert: Callable[[Path], tuple[str, dict[str, Any]]]
    if source.is_file() and source.suffix.lower() == ".gguf":
        convert = _convert_gguf
    elif source.is_dir() and (source / "tokenizer.json").is_file():
        convert = _convert_hf_dir
    else:
        raise ModelError(
            f"{source}: no tokenizer to read; expected a .gguf file or a Hugging Face model directory "
            "with tokenizer.json"
        )
    folder = entry_dir(source)
    tokenizer_path, meta_path = folder / _TOKENIZER_FILE, folder / _META_FILE
    cached = _read_cached(tokenizer_path, meta_path)
    if cached is not None:
        return cached
    backend_json, meta = convert(source)
    write_atomically(tokenizer_path, backend_json.encode("utf-8"))
    write_atomically(meta_path, json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    return LlmTokenizer(Tokenizer.from_str(backend_json), meta)


def _read_cached(tokenizer_path: Path, meta_path: Path) -> LlmTokenizer | None:
    if not (meta_path.is_file() and tokenizer_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            return None
        return LlmTokenizer(Tokenizer.from_file(str(tokenizer_path)), meta)
    except Exception:  # a damaged or unreadable entry: convert again
        return None


# -- the one-time conversion (transformers) -----------------------------------------------------


def _import_auto_tokenizer(source: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelError(
            f"{source}: its tokenizer is converted once with transformers, which is not installed "
            "(pip install transformers)"
        ) from exc
    return AutoTokenizer


def _convert_gguf(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        scalars = _gguf_scalars(path)
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
    kind = scalars.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.model key)")
    supported = _gguf_tokenizer_kinds()
    if kind not in supported:
        raise ModelError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported "
            f"(supported: {', '.join(sorted(supported))})"
        )
    auto = _import_auto_tokenizer(path)
    try:
        tok = auto.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: transformers cannot build its tokenizer ({type(exc).__name__}: {exc})"
        ) from exc
    architecture = scalars.get("general.architecture")
    extra_eos = [scalars[k] for k in _GGUF_EOG_KEYS if isinstance(scalars.get(k), int)]
    template = scalars.get("tokenizer.chat_template")
    return _describe(
        path,
        tok,
        str(architecture) if architecture else None,
        extra_eos,
        template if isinstance(template, str) else None,
    )


def _convert_hf_dir(folder: Path) -> tuple[str, dict[str, Any]]:
    auto = _import_auto_tokenizer(folder)
    try:
        tok = auto.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(
            f"{folder}: transformers cannot build its tokenizer ({type(exc).__name__}: {exc})"
        ) from exc
    architecture = _json_file(folder / "config.json").get("model_type")
    eos = _json_file(folder / "generation_config.json").get("eos_token_id")
    extra_eos = (
        [eos]
        if isinstance(eos, int)
        else [e for e in eos if isinstance(e, int)]
        if isinstance(eos, list)
        else []
    )
    return _describe(folder, tok, architecture if isinstance(architecture, str) else None, extra_eos, None)


def _describe(
    source: Path, tok: Any, architecture: str | None, extra_eos: list[int], file_template: str | None
) -> tuple[str, dict[str, Any]]:
    """The backend tokenizer transformers built, as JSON, and our notes on it."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{source}: transformers gives no fast (tokenizers) tokenizer for it")
    backend_json: str = backend.to_str()
    spec = json.loads(backend_json)

    def token_id(name: str) -> int | None:
        token = getattr(tok, name, None)
        found = backend.token_to_id(str(token)) if token is not None else None
        return int(found) if found is not None else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    eos_ids: list[int] = [eos_id] if eos_id is not None else []
    end_of_turn = backend.token_to_id("<end_of_turn>")
    if architecture and architecture.startswith(_END_OF_TURN_ARCHS) and end_of_turn is not None:
        extra_eos = [*extra_eos, int(end_of_turn)]
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    for extra in extra_eos:
        if extra not in eos_ids and 0 <= extra < vocab_size:
            eos_ids.append(extra)

    template = _transformers_template(tok) or file_template
    if template is None and architecture in _DEFAULT_TEMPLATES:
        template = _DEFAULT_TEMPLATES[architecture]

    clean_up = bool(getattr(tok, "clean_up_tokenization_spaces", False))
    if (
        clean_up
        and spec["model"]["type"] == "BPE"
        and not getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    ):
        clean_up = False  # transformers ignores it for BPE (it would strip spaces before punctuation)
    decoders = list(_decoder_types(spec.get("decoder")))
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "source": str(source),
        "architecture": architecture,
        "bos_id": bos_id,
        "eos_ids": eos_ids,
        "pad_id": token_id("pad_token"),
        "unk_id": token_id("unk_token"),
        "add_bos": _adds_bos(backend, bos_id),
        "special_tokens": {
            str(k): v for k, v in dict(getattr(tok, "special_tokens_map", {})).items() if isinstance(v, str)
        },
        "chat_template": template,
        "clean_up_tokenization_spaces": clean_up,
        "byte_level": "ByteLevel" in decoders,
        "byte_fallback": "ByteFallback" in decoders,
        "metaspace": "Metaspace" in decoders or _replaces_metaspace(spec.get("decoder")),
    }
    return backend_json, meta


def _adds_bos(backend: Any, bos_id: int | None) -> bool:
    """Whether `encode(text)` starts with the BOS (transformers' `add_bos_token` attribute need not
    say: a post-processor from tokenizer.json may add it all the same)."""
    with_special, without = backend.encode("a").ids, backend.encode("a", add_special_tokens=False).ids
    return bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id


def _transformers_template(tok: Any) -> str | None:
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _decoder_types(spec: Any) -> Iterator[str]:
    if isinstance(spec, dict):
        if isinstance(spec.get("type"), str):
            yield spec["type"]
        for inner in spec.get("decoders") or ():
            yield from _decoder_types(inner)


def _replaces_metaspace(spec: Any) -> bool:
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "Replace" and spec.get("pattern", {}).get("String") == "\u2581":
        return True
    return any(_replaces_metaspace(inner) for inner in spec.get("decoders") or ())


def _gguf_tokenizer_kinds() -> set[str]:
    """The `tokenizer.ggml.model` values transformers can convert."""
    import importlib

    for module, name in (
        ("transformers.integrations.gguf.gguf_tokenizer_mapping", "GGUF_TOKENIZER_TYPES"),
        ("transformers.integrations.ggml", "GGUF_TO_FAST_CONVERTERS"),  # transformers 4.x
    ):
        try:
            kinds = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if kinds:
            return {str(k) for k in kinds}
    return {"llama", "gpt2"}


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- GGUF metadata (scalars only) --------------------------------------------------------------

_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_scalars(path: Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays skipped), read without numpy."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise ValueError("no GGUF magic bytes")
        (version,) = struct.unpack_from("<I", blob, 4)
        if version == 1:
            raise ValueError("GGUF version 1 is not supported")
        (count,) = struct.unpack_from("<Q", blob, 16)
        pos = 24
        found: dict[str, Any] = {}

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", blob, at)
            return blob[at + 8 : at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n

        def skip(kind: int, at: int) -> tuple[Any, int]:
            if kind in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[kind]
                return struct.unpack_from(fmt, blob, at)[0], at + struct.calcsize(fmt)
            if kind == _GGUF_STRING:
                return string(at)
            if kind == _GGUF_ARRAY:
                item, n = struct.unpack_from("<IQ", blob, at)
                at += 12
                if item in _GGUF_SCALARS:
                    return None, at + n * struct.calcsize(_GGUF_SCALARS[item])
                for _ in range(n):
                    _, at = skip(item, at)
                return None, at
            raise ValueError(f"unknown metadata value type {kind}")

        for _ in range(count):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            value, pos = skip(kind, pos + 4)
            if kind != _GGUF_ARRAY:
                found[key] = value
        return found


# -- helpers ------------------------------------------------------------------------------------


def _checked_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: give a non-empty list of {'role': ..., 'content': ...} dicts")
    chat: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"messages[{i}]: a message is a dict with 'role' and 'content', got {message!r:.80}"
            )
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(
                f"messages[{i}]: 'role' and 'content' must be strings, got {type(role).__name__} "
                f"and {type(content).__name__}"
            )
        chat.append({str(k): v for k, v in message.items() if v is not None})
    return chat


def _compile_template(source: str) -> jinja2.Template:
    """The template compiled as transformers compiles chat templates: a sandbox, `trim_blocks`,
    `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not
    escape HTML, and the `{% generation %}` tag (rendered as its body)."""
    import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.parser
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 - jinja's own class attribute

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(f"the model's chat template does not parse: {exc}") from exc


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied by it to non-BPE tokenizers that ask for it)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
