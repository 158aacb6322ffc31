"""`dsv3 chat CKPT`: an interactive multi-turn chat in the terminal, streaming tokens through the engine.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /save PATH (the
conversation as JSON), /quit. When the model reasons inside <think>…</think>, the reasoning streams dimmed (on a
terminal) and, as DeepSeek-R1's chat format expects, is left out of the history sent back on later turns. Each
turn's prompt shares the previous turns' tokens, so the engine's prefix cache serves them.
"""
from __future__ import annotations

import argparse
import json
import sys

from dsv3.infer.generate import add_sampling_args, params_from_args
from dsv3.infer.llm import LLM, LoadConfig
from dsv3.options import add_flags, from_args

THINK, THINK_END = "<think>", "</think>"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face layout with tokenizer files)")
    p.add_argument("--system", default="", help="system prompt")
    add_flags(p, LoadConfig)
    add_sampling_args(p)


class _Stream:
    """Prints streamed text, reasoning (between <think> and </think>) dimmed; remembers the answer part."""

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.text, self.thinking = "", False

    def write(self, delta: str) -> None:
        self.text += delta
        while delta:
            tag = THINK_END if self.thinking else THINK
            head, found, delta = delta.partition(tag)
            self._emit(head)
            if found:
                self.thinking = not self.thinking
                self._emit("\n" if not self.thinking else "")
        self.out.flush()

    def _emit(self, s: str) -> None:
        if s:
            self.out.write(f"\x1b[2m{s}\x1b[0m" if self.thinking and self.color else s)

    @property
    def answer(self) -> str:
        text = self.text
        if THINK_END in text:
            text = text.split(THINK_END, 1)[1]
        return text.strip()


def run(args, stdin=sys.stdin, stdout=sys.stdout) -> list[dict]:
    llm = LLM.from_config(args.checkpoint, from_args(LoadConfig, args))
    engine, tok, params = llm.engine, llm.tokenizer, params_from_args(args)
    system = args.system
    messages = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("\nyou> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return messages
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return messages
        if line == "/reset" or line.startswith("/system"):
            system = line[len("/system"):].strip() if line.startswith("/system") else system
            messages = [{"role": "system", "content": system}] if system else []
            stdout.write("(conversation reset)\n")
            continue
        if line.startswith("/save"):
            path = line[len("/save"):].strip() or "chat.json"
            with open(path, "w", encoding="utf-8") as f:
                json.dump(messages, f, ensure_ascii=False, indent=2)
            stdout.write(f"(saved {len(messages)} messages to {path})\n")
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        engine.add_request(prompt, params)
        stream = _Stream(stdout, color=stdout.isatty())
        if interactive:
            stdout.write("assistant> ")
        while engine.has_unfinished():
            for out in engine.step():
                stream.write(out.outputs[0].delta_text)
        stdout.write("\n")
        messages.append({"role": "assistant", "content": stream.answer})
