"""`dsv3 serve` driven by the official `openai` client over real HTTP on a loopback port (tiny random model)."""
import asyncio
import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import random_model, small_v3
from dsv3 import Engine, EngineConfig, ModelConfig, SamplingParams
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents
from dsv3.serve.app import ServerConfig, create_app
from dsv3.tokenizer import fim_prompt

KEY = "sk-test"


class Server:
    """create_app(...) under uvicorn on a free 127.0.0.1 port, in a thread."""

    def __init__(self, engine, **config):
        self.app = create_app(engine, ServerConfig(model_name="tiny", api_keys=frozenset({KEY}), **config))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def client(self, key=KEY, prefix="/v1", async_=False, **kw):
        cls = openai.AsyncOpenAI if async_ else openai.OpenAI
        return cls(base_url=self.url + prefix, api_key=key, max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(list(read_documents(None))[:40], 512)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig.from_hf_dict({"model_type": "deepseek_v3", **small_v3(vocab_size=576),
                                    "max_position_embeddings": 1024, "num_nextn_predict_layers": 0})
    return random_model(cfg, std=0.2)


def engine(model, tok, **kw):
    return Engine(model, tok, EngineConfig(block_size=64, num_blocks=64, **kw))


def greedy_text(model, tok, ids, n):
    """What the engine itself writes for these prompt ids (greedy), without the server."""
    eng, outs = engine(model, tok), []
    eng.add_request(ids, SamplingParams(temperature=0, max_tokens=n))
    while eng.has_unfinished():
        outs += eng.step()
    return outs[-1].outputs[0].text


@pytest.fixture(scope="module")
def server(model, tok):
    s = Server(engine(model, tok))
    yield s
    s.stop()


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who is Romeo?"}]


def test_chat_stream_equals_non_stream_with_usage(server):
    c = server.client()
    full = c.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=24)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    u = full.usage
    assert u.prompt_tokens > 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    chunks = list(c.chat.completions.create(model="deepseek-chat", messages=CHAT, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens


def test_stop_string_ends_the_answer_and_is_not_returned(server):
    c = server.client()
    free = c.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40)
    text = free.choices[0].message.content
    stop = text[10:14]
    assert len(stop) == 4 and stop.strip()
    out = c.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == text[: text.index(stop)]


def test_n_seed_and_logprobs(server):
    c = server.client()
    kw = dict(model="tiny", messages=CHAT, temperature=1.0, max_tokens=12, n=3, seed=7)
    a = c.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    b = c.chat.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]  # same seed
    assert len({ch.message.content for ch in a.choices}) > 1
    for ch in a.choices:
        entries = ch.logprobs.content
        assert len(entries) >= 1 and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
        assert all(e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    assert a.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in a.choices)


def test_fim_completion_equals_the_engine_on_the_fim_prompt(server, model, tok):
    c = server.client(prefix="/beta")
    out = c.completions.create(model="tiny", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n",
                               temperature=0, max_tokens=16, logprobs=2)
    ids = tok.encode(fim_prompt("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"), add_bos=True)
    assert out.choices[0].text == greedy_text(model, tok, ids, 16)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == out.usage.completion_tokens
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == out.choices[0].text
    echo = c.completions.create(model="tiny", prompt="ROMEO.", temperature=0, max_tokens=5, echo=True)
    assert echo.choices[0].text.startswith("ROMEO.")


def test_chat_prefix_completion_continues_the_assistant_text(server, model, tok):
    c = server.client(prefix="/beta")
    msgs = CHAT + [{"role": "assistant", "content": "Romeo is", "prefix": True}]
    out = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=10)
    assert out.choices[0].message.content == greedy_text(model, tok, tok.apply_chat_template(msgs, tokenize=True), 10)


def test_context_cache_hits_and_survives_a_restart(model, tok, tmp_path):
    words = " ".join(f"w{i % 97}" for i in range(110))
    msgs = [{"role": "user", "content": words}]
    usages = []
    for restart in range(2):
        s = Server(engine(model, tok, disk_cache_dir=str(tmp_path / "cache"), host_cache_bytes=1 << 20))
        try:
            c = s.client()
            for _ in range(2 - restart):
                usages.append(c.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                                        max_tokens=4).usage)
        finally:
            s.stop()
    first, second, after_restart = usages
    assert first.prompt_tokens >= 300 and first.prompt_cache_hit_tokens == 0
    for u in (second, after_restart):
        assert u.prompt_cache_hit_tokens >= 256 and u.prompt_cache_hit_tokens % 64 == 0
        assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens


def test_errors_have_the_api_shape(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model="tiny", messages=CHAT)
    c = server.client()
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(model="tiny", messages=CHAT, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5000)
    assert "5000" in e.value.message and "1024" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "x", "prefix": True},
                                                          {"role": "user", "content": "y"}])
    r = httpx.post(server.url + "/chat/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert {m.id for m in c.models.list()} == {"tiny"}


def test_concurrency_limit_429_and_disconnect_frees_blocks(model, tok):
    eng = engine(model, tok)
    s = Server(eng, max_concurrent_per_key=1)
    try:
        c = s.client()
        stream = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=500, stream=True,
                                           temperature=1.0)
        next(iter(stream))  # admitted and running
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
        stream.close()  # the client goes away mid-stream: the request is cancelled, its blocks freed
        deadline = time.time() + 10
        while (eng.has_unfinished() or eng.pool.num_free < eng.pool.num_blocks) and time.time() < deadline:
            time.sleep(0.05)
        assert not eng.has_unfinished() and eng.pool.num_free == eng.pool.num_blocks
        assert c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4).choices  # admitted again
    finally:
        s.stop()


def test_async_client_concurrent_streams(server):
    async def one(c, i):
        text, done = "", False
        stream = await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hi {i}"}],
                                                 max_tokens=16, stream=True, temperature=0.8)
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                done = done or ch.choices[0].finish_reason is not None
        return text, done

    async def main():
        c = server.client(async_=True)
        return await asyncio.gather(*(one(c, i) for i in range(6)))

    results = asyncio.run(main())
    assert all(done for _, done in results)
    raw = httpx.post(server.url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_json_mode_outputs_parse_with_bounded_whitespace(server):
    out = server.client().chat.completions.create(
        model="tiny", messages=CHAT + [{"role": "user", "content": "Answer in JSON."}], temperature=1.0, n=8, seed=3,
        max_tokens=48, response_format={"type": "json_object"})
    assert {c.finish_reason for c in out.choices} <= {"stop", "length"}
    assert any(c.finish_reason == "stop" for c in out.choices)
    for c in out.choices:
        text = c.message.content
        assert text.startswith("{") and not re.search(r"\s{3,}", text)  # whitespace runs: at most 2
        if c.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        # finish_reason "length": the JSON text so far, cut where max_tokens ended it (a prefix of valid JSON)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "metric": {"type": "boolean"}},
                   "required": ["city", "metric"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def _valid_weather(call):
    args = json.loads(call.function.arguments)
    return call.function.name == "get_weather" and set(args) == {"city", "metric"} and \
        args["city"] in ("Paris", "Rome", "Oslo") and isinstance(args["metric"], bool)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_are_valid_stream_alike_and_round_trip(server, choice):
    c = server.client()
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(model="tiny", messages=msgs, tools=[WEATHER, CLOCK], tool_choice=choice, temperature=0.7, seed=11,
              max_tokens=500)  # a random model may spell the call markers byte by byte
    out = c.chat.completions.create(**kw)
    choice0 = out.choices[0]
    assert choice0.finish_reason == "tool_calls" and choice0.message.tool_calls
    calls = choice0.message.tool_calls
    if isinstance(choice, dict):
        assert all(_valid_weather(x) for x in calls)
    for x in calls:  # any tool may be called under "required"; each call's arguments are a JSON object
        assert isinstance(json.loads(x.function.arguments), dict) and x.id and x.type == "function"
        assert x.function.name != "get_weather" or _valid_weather(x)
    # The same seeded request streamed: tool-call deltas accumulate to the same calls.
    acc, finish = {}, None
    for ch in c.chat.completions.create(**kw, stream=True):
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            e = acc.setdefault(d.index, {"name": "", "arguments": ""})
            e["name"] += d.function.name or ""
            e["arguments"] += d.function.arguments or ""
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    assert finish == "tool_calls"
    assert [acc[i] for i in sorted(acc)] == [{"name": x.function.name, "arguments": x.function.arguments}
                                             for x in calls]
    # Round trip: the calls and their results go back in; the model answers (no tool forced this time).
    results = [{"role": "tool", "tool_call_id": x.id, "content": '{"temp_c": 21}'} for x in calls]
    follow = c.chat.completions.create(model="tiny", messages=msgs + [choice0.message.model_dump(exclude_none=True)]
                                       + results, tools=[WEATHER, CLOCK], temperature=0, max_tokens=8)
    assert follow.usage.prompt_tokens > out.usage.prompt_tokens and follow.choices[0].finish_reason


@pytest.mark.parametrize("temperature", [0, 0.7])
def test_a_forced_call_is_a_call_on_a_reasoning_server_whose_prompt_opened_no_think(model, tok, temperature):
    # The server reasons (as it decides for a template that mentions </think>), but this prompt does not open
    # <think>: the grammar must not admit free reasoning text first, or the call never comes (finish "length").
    s = Server(engine(model, tok), reasoning=True)
    try:
        c = s.client()
        kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER, CLOCK],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=temperature,
                  seed=5, max_tokens=500)  # the byte-level BPE may spell the name and markers byte by byte
        out = c.chat.completions.create(**kw)
        m = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and len(m.tool_calls) == 1
        assert _valid_weather(m.tool_calls[0])
        assert not m.content and not getattr(m, "reasoning_content", None)
        chunks = list(c.chat.completions.create(**kw, stream=True))
        args = "".join(d.function.arguments or "" for ch in chunks if ch.choices
                       for d in ch.choices[0].delta.tool_calls or [])
        assert args == m.tool_calls[0].function.arguments
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    finally:
        s.stop()


def test_parallel_tool_calls_false_allows_one_call(server):
    out = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather and time?"}], tools=[WEATHER, CLOCK],
        tool_choice="required", parallel_tool_calls=False, temperature=1.0, n=6, seed=2, max_tokens=300)
    for ch in out.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1


PLACE = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "rain": {"type": "boolean"},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
         "required": ["city", "rain", "days"], "additionalProperties": False}


@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_output_validates_streamed_and_not(server, strict):
    import jsonschema
    c = server.client()
    kw = dict(model="tiny", messages=CHAT, temperature=1.0, n=4, seed=7, max_tokens=200,
              response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE,
                                                                      "strict": strict}})
    out = c.chat.completions.create(**kw)
    for ch in out.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), PLACE)
    streamed = [""] * 4
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == [ch.message.content for ch in out.choices]


def test_structured_outputs_parse_with_the_openai_client_and_bad_schemas_are_400(server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Place(BaseModel):
        city: Literal["Paris", "Rome"]
        days: int = Field(ge=1, le=7)

    c = server.client()
    parsed = c.chat.completions.parse(model="tiny", messages=CHAT, response_format=Place, temperature=0,
                                      max_completion_tokens=200).choices[0].message.parsed
    assert isinstance(parsed, Place)
    loose = {"name": "p", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=CHAT, response_format={"type": "json_schema",
                                                                                "json_schema": loose})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "additionalProperties" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the compiler cannot take it: a 400 that says so
        c.chat.completions.create(model="tiny", messages=CHAT, response_format={"type": "json_schema", "json_schema": {
            "name": "p", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_max_completion_tokens_bounds_a_request(server):
    c = server.client()
    for kw, n in [(dict(max_completion_tokens=5), 5), (dict(max_completion_tokens=5, max_tokens=3), 3)]:
        out = c.chat.completions.create(model="tiny", messages=CHAT, temperature=0, extra_body={"ignore_eos": True},
                                        **kw)
        assert out.usage.completion_tokens == n and out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=CHAT, reasoning_effort="low")
    assert e.value.body["param"] == "reasoning_effort"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=CHAT, extra_body={"max_tokns": 5})
    assert e.value.body["param"] == "max_tokns"


def test_tool_call_and_reasoning_parse_is_the_same_for_every_split():
    from dsv3.serve.parsing import OutputParser
    from dsv3.tokenizer import THINK_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
    call = lambda n, a: f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{n}\n```json\n{a}\n```{TOOL_CALL_END}"  # noqa: E731
    oslo = '{"city": "Oslo"}'
    text = (f"I should check{THINK_END}Let me look.{TOOL_CALLS_BEGIN}{call('get_weather', oslo)}\n"
            f"{call('get_time', '{}')}{TOOL_CALLS_END}")
    whole = OutputParser(True, thinking=True, tools=True).parse(text, True)
    assert whole[0] == "I should check" and whole[1] == "Let me look."
    assert [(x.name, x.arguments) for x in whole[2]] == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    for step in (1, 2, 3, 5, 8, 13, len(text)):  # every chunking: one character at a time ... all in one delta
        p, r, c, calls = OutputParser(True, thinking=True, tools=True), "", "", {}
        cuts = list(range(step, len(text), step)) + [len(text)]
        for k in cuts:
            d = p.delta(text[:k], k == len(text))
            r, c = r + d.get("reasoning_content", ""), c + d.get("content", "")
            for t in d.get("tool_calls", []):
                e = calls.setdefault(t["index"], ["", ""])
                e[0] += t.get("function", {}).get("name", "")
                e[1] += t["function"]["arguments"]
        assert (r, c) == whole[:2]
        assert [tuple(calls[i]) for i in sorted(calls)] == [(x.name, x.arguments) for x in whole[2]]


def test_metrics_and_health(server):
    c = server.client()
    before = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0).usage
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['dsv3_requests_total{route="/chat/completions",status="200"}'] >= 1
    assert values["dsv3_generation_tokens_total"] >= before.completion_tokens
    assert values["dsv3_time_to_first_token_seconds_count"] >= 1
    assert values["dsv3_kv_blocks_total"] == 64 and values["dsv3_kv_blocks_in_use"] == 0
    assert 0 <= values['dsv3_prefix_cache_hit_ratio{tier="device"}'] <= 1
    assert values["dsv3_prefix_cache_queried_tokens_total"] >= before.prompt_tokens


def test_an_engine_failure_is_a_500_and_the_server_goes_on(model, tok):
    eng = engine(model, tok)
    s = Server(eng)
    real, calls = eng.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real()

    eng.step = failing_once
    try:
        c = s.client()
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
        assert e.value.body["type"] == "server_error"
        calls.clear()  # and once more while streaming: the 200 is out, so an error event ends the stream
        with pytest.raises(openai.APIError):
            list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True))
        assert c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4).choices[0].finish_reason
        assert eng.pool.num_free == eng.pool.num_blocks
    finally:
        s.stop()


def test_a_queued_stream_gets_keep_alives(model, tok):
    s = Server(Engine(model, tok, EngineConfig(block_size=64, num_blocks=64, max_num_seqs=1)), keepalive_s=0.1)
    try:
        c = s.client()
        first = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=200, stream=True,
                                          extra_body={"ignore_eos": True})
        next(iter(first))  # running: the engine takes one sequence at a time, so the next request waits
        lines = []
        with httpx.stream("POST", s.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "messages": CHAT, "max_tokens": 2, "stream": True}) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith('data: {"id"') and '"content": "' in line and '"role"' not in line:
                    break  # the first token: the request left the queue
        first.close()
        waited = lines[: next(i for i, x in enumerate(lines) if '"role"' not in x and x.startswith("data: {"))]
        assert ": keep-alive" in waited
    finally:
        s.stop()


def test_reasoning_content_is_split_out_streamed_and_not(model, tok):
    s = Server(engine(model, tok), reasoning=True)
    try:
        c = s.client()
        # The assistant text opens <think> (as R1 templates end their generation prompt): what follows is
        # reasoning until </think>, which this random model does not write, so all of it is reasoning.
        msgs = CHAT + [{"role": "assistant", "content": "<think>\n", "prefix": True}]
        out = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12)
        m = out.choices[0].message
        assert m.reasoning_content and m.content == ""
        assert 0 < out.usage.completion_tokens_details.reasoning_tokens
        chunks = list(c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12,
                                                stream=True, stream_options={"include_usage": True}))
        streamed = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks
                           if ch.choices)
        assert streamed == m.reasoning_content
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
    finally:
        s.stop()


def test_default_model_name_names_the_run_and_step(tmp_path):
    from dsv3.serve.server import default_model_name
    assert default_model_name(tmp_path / "quickstart/checkpoints/step_0000960/model") == "quickstart-step_0000960"
    assert default_model_name(tmp_path / "DeepSeek-V2-Lite") == "DeepSeek-V2-Lite"
    assert default_model_name(tmp_path / "export/model") == "model"  # not a run's checkpoint: the directory's name
