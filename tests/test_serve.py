"""`dsv3 serve` driven by the official `openai` client over real HTTP on a loopback port (tiny random model)."""
import asyncio
import json
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
