"""DeepSeek-V3 tokenizer: tokenizer.json (byte-level BPE) + chat template + fill-in-the-middle.

Design notes
- The BPE itself is HF `tokenizers` (Rust). This file adds what the model needs on top of it: DeepSeek's
  special tokens, the chat format and the FIM prompt. transformers is a test oracle only, never imported here.
- Two chat paths. A checkpoint whose tokenizer_config.json carries a Jinja `chat_template` is rendered by that
  template in the Jinja setup transformers uses, so our prompts are token-identical to the reference stack.
  Without one (tokenizers we train ourselves) a built-in renderer writes the DeepSeek-V3 format
  (docs/api.md#chat-template).
- BOS: DeepSeek's tokenizer.json post-processor adds no special tokens (and transformers 5 ignores
  `add_bos_token` when a tokenizer.json exists), so plain `encode` never adds BOS. Chat templates write BOS
  themselves; pretraining documents and FIM prompts ask for it with `add_bos=True`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Copied from DeepSeek's tokenizer.json: "｜" is U+FF5C (fullwidth vertical line), "▁" is U+2581.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
THINK = "<think>"
THINK_END = "</think>"
# Tokenizer training reserves exactly these, each as one id.
SPECIAL_TOKENS = (
    BOS, EOS, USER, ASSISTANT, FIM_BEGIN, FIM_HOLE, FIM_END,
    TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
    TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, THINK, THINK_END,
)  # fmt: skip


def _token_content(value) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken {"content": ...}.
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None):
        self.tok = tok
        self.config = dict(config or {})
        self.bos_token = _token_content(self.config.get("bos_token")) or BOS
        self.eos_token = _token_content(self.config.get("eos_token")) or EOS
        self.pad_token = _token_content(self.config.get("pad_token"))
        # Not get_vocab_size(): that counts entries, and added tokens may leave holes in the id space; the
        # embedding table must cover the largest id.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file, cfg_file = path / "tokenizer.json", path / "tokenizer_config.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {tok_file}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise ValueError(f"cannot parse {tok_file}: {e}") from e
        config = {}
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"cannot parse {cfg_file}: {e}") from e
        # transformers saves templates to chat_template.jinja and lets that file win over the config entry.
        if (jinja_file := path / "chat_template.jinja").is_file():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        return cls(tok, config)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (what from_dir and transformers' AutoTokenizer read).
        Each file goes to a temp name and is renamed over the target, so a crash never leaves half a file."""
        import os  # local: the only use in this module

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = json.dumps(self.config, indent=2, ensure_ascii=False)
        files = {"tokenizer.json": self.tok.to_str(), "tokenizer_config.json": config}
        for name, text in files.items():
            tmp = directory / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, directory / name)

    @property
    def bos_id(self) -> int:
        return self._required_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._required_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self._required_id(self.pad_token)

    def _required_id(self, token: str) -> int:
        # Checked on use, not in __init__, so a bare BPE trained in memory can be wrapped before it has specials.
        if (i := self.tok.token_to_id(token)) is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def encode(self, text: str, add_bos: bool = False, add_special_tokens: bool = True) -> list[int]:
        # add_special_tokens=True runs tokenizer.json's post-processor, which is what transformers'
        # `tokenizer(text)["input_ids"]` does; for DeepSeek that post-processor is a ByteLevel offset fixer,
        # so both settings give the same ids. Special-token strings inside `text` always become their single ids
        # (as in transformers): escape untrusted text before encoding it if that matters.
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_bos and ids[:1] != [self.bos_id]:  # never a double BOS if a post-processor already added one
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # skip_special_tokens drops only tokens flagged special in tokenizer.json: for DeepSeek that is BOS/EOS and
        # the placeholders, while <｜User｜>, tool markers and <think> are plain added tokens and stay.
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
        tokenize: bool = False, **extra,
    ) -> str | list[int]:  # fmt: skip
        """Chat Prefix Completion: a last assistant message with `prefix: True` is rendered as the generation
        prompt followed by its content, with no EOS, so the model continues that text. Both paths render the
        other messages with add_generation_prompt=True and append the content, because a template would close
        an assistant message with EOS. `extra` becomes Jinja variables (ignored by the built-in format)."""
        # Like transformers, drop None-valued keys: OpenAI clients send tool_calls=None and templates test
        # `'tool_calls' in message`. NOTE(deviation): a None/missing content becomes "" instead of disappearing,
        # since DeepSeek's own templates index message['content'] and would raise on the OpenAI tool-call shape.
        msgs = [{k: v for k, v in m.items() if v is not None} | {"content": m.get("content") or ""} for m in messages]
        if not msgs:
            raise ValueError("apply_chat_template needs at least one message")
        if any(m.get("prefix") for m in msgs[:-1]):
            raise ValueError("prefix=True is allowed only on the last message")
        prefix = ""
        if msgs[-1].get("prefix"):
            if msgs[-1]["role"] != "assistant":
                raise ValueError(f"prefix=True needs role 'assistant', got {msgs[-1]['role']!r}")
            msgs, prefix, add_generation_prompt = msgs[:-1], msgs[-1]["content"], True
        template = self._chat_template(tools)
        if template is None:
            text = self._render_builtin(msgs, tools, add_generation_prompt)
        else:
            text = self._render_jinja(template, msgs, tools, add_generation_prompt, extra)
        # The template already wrote BOS, so no post-processor / BOS on top (transformers does the same).
        return self.encode(text + prefix, add_special_tokens=False) if tokenize else text + prefix

    def _chat_template(self, tools) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers picks "tool_use" when tools are given
            named = {t["name"]: t["template"] for t in template}
            template = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
        return template

    def _render_jinja(self, template: str, msgs: list[dict], tools, add_generation_prompt: bool, extra) -> str:
        if tools and "tools" not in template:
            # NOTE(deviation from transformers): DeepSeek's official templates never read `tools`, so the model
            # would not see them (docs/api.md#chat-template). Hand them over as one more system message after the
            # leading ones; these templates join system texts with "\n\n", which gives exactly the built-in layout.
            i = next((k for k, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
            msgs = [*msgs[:i], {"role": "system", "content": tools_prompt(tools)}, *msgs[i:]]
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        variables = {k: v for k, v in names.items() if v is not None} | extra  # extra wins, as in transformers
        return _compile(template).render(
            messages=msgs, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )

    def _render_builtin(self, msgs: list[dict], tools, add_generation_prompt: bool) -> str:
        # DeepSeek-V3 layout (docs/api.md#chat-template), the same token sequence as the official template but
        # with its state bugs fixed: every tool-outputs block is opened and closed, and each tool-call message gets
        # its own header.
        system = [m["content"] for m in msgs if m["role"] == "system"] + ([tools_prompt(tools)] if tools else [])
        out = [self.bos_token, "\n\n".join(system)]
        in_outputs = False
        for m in msgs:
            if m["role"] == "tool":  # consecutive tool results share one outputs block
                out += ["" if in_outputs else TOOL_OUTPUTS_BEGIN, TOOL_OUTPUT_BEGIN, m["content"], TOOL_OUTPUT_END]
                in_outputs = True
                continue
            after_outputs, in_outputs = in_outputs, False
            if after_outputs:
                out.append(TOOL_OUTPUTS_END)
            if m["role"] == "user":
                out.append(USER + m["content"])
            elif m["role"] == "assistant":
                # Earlier turns keep only the answer: R1 drops past reasoning from the context.
                text = m["content"].split(THINK_END)[-1]
                if calls := m.get("tool_calls"):
                    text += TOOL_CALLS_BEGIN + "\n".join(map(_tool_call, calls)) + TOOL_CALLS_END
                # After tool outputs the model continues right after <｜tool▁outputs▁end｜>, without <｜Assistant｜>:
                # that is how the official template lays it out (and why it adds no generation prompt there).
                out.append(("" if after_outputs else ASSISTANT) + text + self.eos_token)
            elif m["role"] != "system":
                raise ValueError(f"unknown message role {m['role']!r}")
        if in_outputs:
            out.append(TOOL_OUTPUTS_END)
        elif add_generation_prompt:
            out.append(ASSISTANT)
        return "".join(out)


def _tool_call(call: dict) -> str:
    # OpenAI shape {"type": "function", "function": {"name", "arguments"}}; arguments are a JSON string on the
    # wire, but a dict is accepted and serialized the way the model writes JSON (non-ASCII kept).
    fn = call["function"]
    args = fn["arguments"]
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    kind = call.get("type", "function")
    return f"{TOOL_CALL_BEGIN}{kind}{TOOL_SEP}{fn['name']}\n```json\n{args}\n```{TOOL_CALL_END}"


def tools_prompt(tools: list[dict]) -> str:
    """The `# Tools` block that goes into the system part (docs/api.md#chat-template): one JSON signature per
    line, then the exact call format the model must answer with."""
    signatures = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    call = f"{TOOL_CALL_BEGIN}function{TOOL_SEP}NAME\n```json\nARGS\n```{TOOL_CALL_END}"
    return (
        "# Tools\n\nYou may call one or more functions to answer. Available functions, as JSON signatures:\n"
        f"{signatures}\n\nTo call functions, answer in exactly this format, with NAME a function name and ARGS its "
        f"arguments as a JSON object; several calls are separated by a newline inside one block:\n"
        f"{TOOL_CALLS_BEGIN}{call}{TOOL_CALLS_END}"
    )


def fim_prompt(prefix: str, suffix: str) -> str:
    # PSM order, as in DeepSeek-V3 pretraining (DeepSeek-V3 report §4.1) and docs/api.md#fim-completions; the
    # model writes the middle after FIM_END. No BOS here: encode with add_bos=True, because FIM documents start
    # after BOS in pretraining and DeepSeek-Coder's FIM examples get BOS from a tokenizer that adds it by default.
    return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}"


class _Generation(jinja2.ext.Extension):
    # `{% generation %}…{% endgeneration %}` marks assistant text for transformers' loss masks; we render the body.
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, ') and would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # The Jinja setup of transformers' apply_chat_template, so a checkpoint's template renders byte-identically:
    # an immutable sandbox (templates are untrusted code from model repos), trim_blocks + lstrip_blocks,
    # loop controls, and the tojson / raise_exception / strftime_now helpers templates call.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
