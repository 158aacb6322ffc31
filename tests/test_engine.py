"""The inference engine against full recomputation: paged latent cache, absorbed decode, chunked prefill,
continuous batching, prefix cache, preemption (float32, greedy, exact tokens)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import random_model, rel_err, small_v3
from dsv3 import LLM, Engine, EngineConfig, ModelConfig, SamplingParams, save_model
from dsv3.data.bpe import train_bpe
from dsv3.infer.kv_cache import bytes_per_token
from dsv3.infer.paged_kv import PagedKV
from dsv3.infer.transform import prepare_for_engine

TEXT = ["The king speaks to the queen, and the ghost walks upon the wall at night. " * 3,
        "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 3]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 512)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig.from_hf_dict({"model_type": "deepseek_v3", **small_v3(vocab_size=576),
                                    "num_nextn_predict_layers": 1})
    return random_model(cfg, std=0.2)


def reference_greedy(model, prompt, n):
    """Greedy decoding by full recomputation, no cache of any kind."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, 500, (L,), generator=g).tolist() for L in lengths[:n]]


def run(engine, schedule):
    """schedule: {step: [(prompt, params)]}: requests join at those steps. Returns {request_id: RequestOutput}."""
    done, step, ids = {}, 0, {}
    while step <= max(schedule) or engine.has_unfinished():
        for p, sp in schedule.get(step, []):
            ids[engine.add_request(p, sp)] = p
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done, ids


GREEDY = dict(temperature=0.0, ignore_eos=True)


def as_on_a_gpu(engine):
    """Steps of up to a block of new tokens per sequence (short prompts, the tail after a prefix-cache hit) on
    the absorbed-row path, as with CUDA graphs (Engine.absorbed_max_query)."""
    engine.absorbed_max_query = engine.config.block_size
    engine._decode = _CountRows(engine._decode)
    return engine


class _CountRows:
    """A DecodeRunner that notes the rows of each call."""

    def __init__(self, runner):
        self.runner, self.rows = runner, []

    def __call__(self, ids, *rest):
        self.rows.append(len(ids))
        return self.runner(ids, *rest)

    def __getattr__(self, name):
        return getattr(self.runner, name)


@pytest.mark.parametrize("spec", [0, 1])
def test_greedy_engine_equals_full_recomputation_with_joins_and_chunked_prefill(model, tok, spec):
    # Blocks of 16 and a 40-token budget: prompts span several blocks and are prefilled in chunks, side by side
    # with other sequences' decode steps; requests join at different steps and finish at different lengths.
    # With spec=1 every decode step also verifies an MTP draft (this random model's drafts are mostly wrong).
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=64, max_batched_tokens=40,
                                             speculative_tokens=spec))
    ps = prompts(4, [5, 37, 70, 19])
    lens = [64, 70, 65, 66]
    sp = [SamplingParams(max_tokens=n, **GREEDY) for n in lens]
    schedule = {0: [(ps[0], sp[0]), (ps[1], sp[1])], 3: [(ps[2], sp[2])], 20: [(ps[3], sp[3])]}
    done, ids = run(engine, schedule)
    for rid, out in done.items():
        p = ids[rid]
        assert out.outputs[0].token_ids == reference_greedy(model, p, len(out.outputs[0].token_ids))
        assert out.outputs[0].finish_reason == "length"
    assert sorted(len(o.outputs[0].token_ids) for o in done.values()) == sorted(lens)
    assert engine.pool.num_free == engine.pool.num_blocks  # everything released
    assert (engine.drafted > 100) == bool(spec)


@pytest.mark.parametrize("spec", [0, 1])
def test_short_prompts_joining_decodes_as_absorbed_rows(model, tok, spec):
    # As on a GPU: prompts of up to a block join running decodes in one step of absorbed rows.
    engine = as_on_a_gpu(Engine(model, tok, EngineConfig(block_size=16, num_blocks=64, speculative_tokens=spec)))
    ps = prompts(3, [37, 5, 16], seed=2)
    sp = SamplingParams(max_tokens=20, **GREEDY)
    done, ids = run(engine, {0: [(ps[0], sp)], 3: [(ps[1], sp)], 5: [(ps[2], sp)]})
    for rid, out in done.items():
        assert out.outputs[0].token_ids == reference_greedy(model, ids[rid], 20)
    assert max(engine._decode.rows) >= 16 + 1 + 1  # the 16-token prompt beside the two decodes


class _Oracle:
    """Drafts from a known greedy continuation, right and wrong in turn, so verification both accepts (two
    tokens per step) and rejects (cache rollback) along the way."""

    def __init__(self, refs):
        self.refs, self.calls = refs, 0  # prompt tuple -> the full greedy continuation

    def __call__(self, logits, seqs, eos_id):
        drafts = []
        for seq in seqs:
            ref, i = self.refs[tuple(seq.prompt_ids)], len(seq.output_ids)  # the draft stands for output[i]
            right = ref[i] if i < len(ref) else 0
            self.calls += 1
            drafts.append(right if self.calls % 2 else (right + 1) % 500)
        return drafts, [None] * len(seqs)


def test_mtp_speculation_accepting_and_rejecting_keeps_greedy_tokens(model, tok, monkeypatch):
    ps = prompts(3, [21, 40, 9], seed=9)
    refs = {tuple(p): reference_greedy(model, p, 70) for p in ps}
    monkeypatch.setattr("dsv3.infer.engine.propose", _Oracle(refs))
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=24, max_batched_tokens=48,
                                             speculative_tokens=1))
    done, ids = run(engine, {0: [(p, SamplingParams(max_tokens=64, **GREEDY)) for p in ps[:2]],
                             5: [(ps[2], SamplingParams(max_tokens=60, **GREEDY))]})
    for rid, out in done.items():
        assert out.outputs[0].token_ids == refs[tuple(ids[rid])][: len(out.outputs[0].token_ids)]
        assert len(out.outputs[0].token_ids) in (64, 60)
    assert 0.3 < engine.accepted / engine.drafted < 0.7  # half the drafts are right by construction


def test_speculative_sampling_keeps_the_main_models_distribution():
    # The rejection rule on a toy case: whatever q proposes, the token emitted in the draft's place is
    # distributed as p (chi-square against p, 20k trials, p-value 0.001 for 4 degrees of freedom: 18.47).
    from types import SimpleNamespace

    from dsv3.infer.sampler import draw
    from dsv3.infer.speculative import verify
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([0.3, 0.1, 0.3, 0.05, 0.25])
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, max_tokens=100)
    logits = torch.stack([p.log(), p.log()])  # row 1 (the bonus token) is not what this test measures
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        d = draw(q, g)
        seq = SimpleNamespace(params=params, draft=[d], draft_q=q, generator=g, prompt_ids=[1], output_ids=[])
        counts[verify(logits, seq, None)[0][0]] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.47, (chi2, counts / n)


@pytest.mark.parametrize("spec", [0, 1])
@pytest.mark.parametrize("absorbed", [False, True])
def test_prefix_cache_hit_reuses_blocks_and_keeps_tokens(model, tok, spec, absorbed):
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=64, speculative_tokens=spec))
    if absorbed:
        as_on_a_gpu(engine)
    base = prompts(1, [50])[0]
    first, _ = run(engine, {0: [(base, SamplingParams(max_tokens=8, **GREEDY))]})
    assert next(iter(first.values())).num_cached_tokens == 0
    follow = base[:40] + prompts(1, [12], seed=1)[0]  # shares 40 tokens: 2 full blocks of 16
    second, _ = run(engine, {0: [(follow, SamplingParams(max_tokens=64, **GREEDY))]})
    out = next(iter(second.values()))
    assert out.num_cached_tokens == 32
    assert out.outputs[0].token_ids == reference_greedy(model, follow, 64)
    # A prompt made only of cached full blocks still recomputes its last block: its last token's logits are needed.
    again, _ = run(engine, {0: [(base[:48], SamplingParams(max_tokens=4, **GREEDY))]})
    out = next(iter(again.values()))
    assert out.num_cached_tokens == 32 and out.outputs[0].token_ids == reference_greedy(model, base[:48], 4)
    if absorbed:  # that last block went in as 16 absorbed rows
        assert 16 in engine._decode.rows


def test_weights_changed_never_serves_the_old_weights_cache(model, tok, tmp_path):
    import copy
    m = copy.deepcopy(model)
    engine = Engine(m, tok, EngineConfig(block_size=16, num_blocks=6, host_cache_bytes=1 << 20,
                                         disk_cache_dir=str(tmp_path)))
    p = prompts(1, [50], seed=4)[0]
    run(engine, {0: [(p, SamplingParams(max_tokens=4, **GREEDY))]})
    run(engine, {0: [(q, SamplingParams(max_tokens=4, **GREEDY)) for q in prompts(2, [40, 40], seed=5)]})  # evict
    engine.flush_cache()  # every tier holds the prompt's blocks now
    hit, _ = run(engine, {0: [(p, SamplingParams(max_tokens=4, **GREEDY))]})
    assert next(iter(hit.values())).num_cached_tokens == 48
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)  # an in-place update, as RL makes
    engine.weights_changed()
    out, _ = run(engine, {0: [(p, SamplingParams(max_tokens=8, **GREEDY))]})
    out = next(iter(out.values()))
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == reference_greedy(m, p, 8)
    engine.add_request(p, SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="requests run"):
        engine.weights_changed()


def test_preemption_when_the_pool_runs_out_recomputes_and_keeps_tokens(model, tok):
    # 12 blocks of 16 tokens cannot hold three sequences growing to ~90 tokens each: someone is preempted.
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=12, max_batched_tokens=64))
    ps = prompts(3, [30, 25, 20], seed=2)
    done, ids = run(engine, {0: [(p, SamplingParams(max_tokens=64, **GREEDY)) for p in ps]})
    assert engine.scheduler.preemptions > 0
    for rid, out in done.items():
        assert out.outputs[0].token_ids == reference_greedy(model, ids[rid], 64)


def test_abort_frees_blocks_at_once(model, tok):
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=32))
    rid = engine.add_request(prompts(1, [40])[0], SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    engine.abort(rid)
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_unfinished()


@pytest.mark.parametrize("spec", [0, 1])
def test_seeded_sampling_is_reproducible_across_batch_compositions(model, tok, spec):
    p = prompts(1, [20], seed=3)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    cfg = EngineConfig(block_size=16, num_blocks=64, speculative_tokens=spec)
    alone, _ = run(Engine(model, tok, cfg), {0: [(p, sp)]})
    others = [(q, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)) for q in prompts(3, [9, 33, 14], 4)]
    crowd, ids = run(Engine(model, tok, cfg), {0: others[:2], 1: [(p, sp)] + others[2:]})
    mine = [o for rid, o in crowd.items() if ids[rid] == p][0]
    assert mine.outputs[0].token_ids == next(iter(alone.values())).outputs[0].token_ids


def test_stop_token_and_stop_string_end_the_completion(model, tok):
    p = prompts(1, [12], seed=5)[0]
    ref = reference_greedy(model, p, 20)
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=64))
    done, _ = run(engine, {0: [(p, SamplingParams(max_tokens=20, stop_token_ids=[ref[6]], **GREEDY))]})
    c = next(iter(done.values())).outputs[0]
    k = ref.index(ref[6])
    assert c.token_ids == ref[: k + 1] and c.finish_reason == "stop" and c.stop_reason == ref[6]
    full = tok.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a stop string in the middle of the text
    assert len(stop) == 3 and stop.strip()
    done, _ = run(engine, {0: [(p, SamplingParams(max_tokens=20, stop=[stop], **GREEDY))]})
    c = next(iter(done.values())).outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop and c.text == full[: full.index(stop)]


def test_n_samples_share_the_prompt_blocks(model, tok):
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=64))
    p = prompts(1, [40], seed=6)[0]
    done, _ = run(engine, {0: [(p, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))]})
    out = next(iter(done.values()))
    assert [c.index for c in out.outputs] == [0, 1, 2] and all(len(c.token_ids) == 10 for c in out.outputs)
    assert engine.pool.hits == 2 * 32  # siblings 1 and 2 reused the 2 full prompt blocks of sample 0
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct streams


def test_cache_bytes_per_token_is_the_latent_width(model):
    cfg = model.config  # kv_lora_rank 16 + rope 8, 3 layers
    assert bytes_per_token(cfg, torch.float32) == (16 + 8) * 3 * 4
    assert bytes_per_token(cfg, torch.bfloat16, extra_layers=1) == (16 + 8) * 4 * 2
    for spec in (0, 1):  # with MTP speculation its module's latents are cached too
        engine = Engine(model, train_bpe(TEXT, 512),
                        EngineConfig(block_size=16, num_blocks=10, speculative_tokens=spec))
        stored = sum(t.numel() * t.element_size() for t in engine.kv)
        assert stored == (10 + 1) * 16 * (16 + 8) * (3 + spec) * 4  # + the scratch block of CUDA graphs


def test_absorbed_decode_matches_expanded_attention_per_layer(model):
    # Layer by layer: the last token through the absorbed path over a cache written by an expanded prefill,
    # against the expanded (training) attention over the whole sequence.
    T, bs = 23, 8
    g = torch.Generator().manual_seed(8)
    x = torch.randn(T, model.config.hidden_size, generator=g)
    from dsv3.model.rope import cos_sin
    cos, sin = cos_sin(torch.arange(T)[None], model.rope_inv_freq, model.rope_factor)
    prepare_for_engine(model)  # the engine's MLA attends over the paged cache
    width = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    for layer in model.layers:
        attn = layer.self_attn
        with torch.no_grad():
            full = attn(x[None], cos, sin)[0, -1]
            pools = [torch.zeros(4, bs, width) for _ in model.layers]
            table = torch.tensor([[2, 0, 3]])
            slots = lambda p: torch.tensor([table[0, i // bs] * bs + i % bs for i in p])  # noqa: E731
            attn(x[: T - 1], cos[0, : T - 1], sin[0, : T - 1],
                 cache=PagedKV(pools, slots(range(T - 1)), table, [T - 1], [T - 1]))
            last = attn(x[T - 1:], cos[0, T - 1:], sin[0, T - 1:],
                        cache=PagedKV(pools, slots([T - 1]), table, [T], [1]))
        assert rel_err(last[0], full) < 1e-5


def test_llm_api_and_generate_cli_match_full_recomputation(model, tok, tmp_path):
    save_model(model, tmp_path)
    tok.save(tmp_path)
    ids = tok.encode("The king speaks", add_bos=True)
    ref = reference_greedy(model, ids, 12)
    greedy = SamplingParams(max_tokens=12, **GREEDY)
    outs = LLM(tmp_path, device="cpu").generate(["The king speaks", ids[:5]], greedy, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == ref and outs[0].prompt_token_ids == ids
    assert outs[1].outputs[0].token_ids == reference_greedy(model, ids[:5], 12)
    assert outs[0].outputs[0].text == tok.decode(ref, skip_special_tokens=True)
    r = subprocess.run([sys.executable, "-m", "dsv3", "generate", str(tmp_path), "--prompt", "The king speaks",
                        "--temperature", "0", "--max-tokens", "12", "--ignore-eos", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["token_ids"] == ref
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LLM(tmp_path, device="cpu").generate([[1, 10**6]], greedy)


@pytest.mark.parametrize("spec", [0, 1])
def test_disk_tier_survives_a_restart_and_corrupt_files_are_misses(model, tok, tmp_path, spec):
    base = prompts(1, [50], seed=10)[0]
    cfg = EngineConfig(block_size=16, num_blocks=64, disk_cache_dir=str(tmp_path / "kv"), speculative_tokens=spec)
    first = Engine(model, tok, cfg)
    run(first, {0: [(base, SamplingParams(max_tokens=8, **GREEDY))]})
    first.flush_cache()  # as a graceful shutdown does
    files = sorted((tmp_path / "kv").glob("*.kv"))
    assert len(files) == 3  # 58 tokens: 3 full blocks of 16
    follow = base[:48] + [7, 8, 9]
    ref = reference_greedy(model, follow, 64)
    second = Engine(model, tok, cfg)  # a restart: an empty pool, the same directory
    done, _ = run(second, {0: [(follow, SamplingParams(max_tokens=64, **GREEDY))]})
    out = next(iter(done.values()))
    assert out.num_cached_tokens == 48 and second.store.loaded == 3 and out.outputs[0].token_ids == ref
    # Damaged files are misses, dropped, never a crash or a wrong token: a flipped byte in block 1, then a
    # truncated block 0, then a valid file written for another model.
    path = [tmp_path / "kv" / (h.hex() + ".kv") for h in second.pool.chain_hashes(base[:48], [])]
    blob = path[1].read_bytes()
    path[1].write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    for expect_cached, damage in ((16, "flipped byte in block 1"), (0, "truncated block 0"), (0, "foreign block 0")):
        if damage == "truncated block 0":
            path[0].write_bytes(path[0].read_bytes()[:100])
        elif damage == "foreign block 0":  # a well-formed file, under this chain's name, of another model
            foreign = Engine(model, tok, cfg, model_id="another model")
            foreign.store.put(0, second.pool.chain_hashes(base[:16], [])[0])
            assert path[0].exists()
        engine = Engine(model, tok, cfg)
        done, _ = run(engine, {0: [(follow, SamplingParams(max_tokens=64, **GREEDY))]})
        out = next(iter(done.values()))
        assert out.num_cached_tokens == expect_cached and out.outputs[0].token_ids == ref, damage
        if damage == "flipped byte in block 1":
            engine.flush_cache()  # the rerun stored blocks 1-2 again: damage block 0 on its own next
            path[1].unlink()
    assert not path[1].exists() and not path[0].exists()


def test_host_tier_keeps_evicted_blocks(model, tok):
    # 8 blocks of 16: the first prompt's blocks are evicted by the next request, spill to host memory, and come
    # back for a request that repeats it.
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=8, host_cache_bytes=1 << 20))
    a, b = prompts(2, [40, 120], seed=11)  # b needs all 8 blocks
    run(engine, {0: [(a, SamplingParams(max_tokens=4, **GREEDY))]})
    run(engine, {0: [(b, SamplingParams(max_tokens=4, **GREEDY))]})
    assert not set(engine.pool.chain_hashes(a, [])) & set(engine.pool.by_hash)  # gone from the pool
    done, _ = run(engine, {0: [(a, SamplingParams(max_tokens=20, **GREEDY))]})
    out = next(iter(done.values()))
    assert out.num_cached_tokens == 32 and engine.store.loaded == 2
    assert out.outputs[0].token_ids == reference_greedy(model, a, 20)


def test_chat_cli_streams_turns_and_keeps_history_without_reasoning(model, tok, tmp_path):
    from dsv3.infer.chat import _Stream
    save_model(model, tmp_path)
    tok.save(tmp_path)
    script = "the king speaks\n/save " + str(tmp_path / "chat.json") + "\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "dsv3", "chat", str(tmp_path), "--temperature", "0", "--max-tokens", "8",
                        "--system", "be brief"], input=script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    prompt = tok.apply_chat_template(saved[:2], add_generation_prompt=True, tokenize=True)
    expect = tok.decode(reference_greedy(model, prompt, 8), skip_special_tokens=True)
    assert saved[2]["content"] == expect.strip() and expect in r.stdout
    # Reasoning between <think> and </think> streams (dimmed on a terminal) but stays out of the history.
    import io
    out = io.StringIO()
    s = _Stream(out, color=True)
    for d in ["<think>", "let me ", "see", "</think>", "The answer", " is 4."]:
        s.write(d)
    assert s.answer == "The answer is 4." and "\x1b[2mlet me \x1b[0m" in out.getvalue()


def test_overlapped_decode_gives_the_plain_loops_outputs(model, tok):
    """EngineConfig.overlap (on by default with CUDA graphs) launches each decode step before reading back the
    previous one's tokens, feeding them on the device. Forced on here on the CPU, over requests that join late,
    stop on a token, sample with seeds (n=2, top_k), ask for logprobs (plain steps while it runs) and get aborted:
    every completion and its streamed deltas equal the plain loop's, greedy ones equal full recomputation, the
    pool ends empty, and most steps ran overlapped."""
    ps = prompts(6, [5, 37, 70, 19, 12, 28], seed=8)
    ref = reference_greedy(model, ps[4], 30)
    schedule = {0: [(ps[0], SamplingParams(max_tokens=40, **GREEDY)),
                    (ps[1], SamplingParams(temperature=0.9, seed=3, max_tokens=33, ignore_eos=True)),
                    (ps[2], SamplingParams(n=2, temperature=1.0, seed=5, top_k=50, max_tokens=25))],
                6: [(ps[3], SamplingParams(temperature=0.7, seed=9, max_tokens=45, ignore_eos=True))],
                9: [(ps[4], SamplingParams(max_tokens=30, stop_token_ids=[ref[12]], **GREEDY))],
                30: [(ps[5], SamplingParams(max_tokens=8, logprobs=2, **GREEDY))]}

    def generate(overlap):
        engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=64, overlap=overlap))
        reads = []
        read = engine._read_ahead
        engine._read_ahead = lambda a: reads.append(len(a.seqs)) or read(a)
        streams, done, step, order = {}, {}, 0, []
        while step <= max(schedule) or engine.has_unfinished():
            for p, sp in schedule.get(step, []):
                order.append(engine.add_request(p, sp))
            if step == 20:
                engine.abort(order[3])  # mid-way, while a step may be in flight
            for out in engine.step():
                for c in out.outputs:
                    s = streams.setdefault((order.index(out.request_id), c.index), ["", []])
                    s[0] += c.delta_text
                    s[1] += c.delta_token_ids
                if out.finished:
                    done[order.index(out.request_id)] = out
            step += 1
        assert engine.pool.num_free == engine.pool.num_blocks
        return done, streams, len(reads), step

    plain, plain_streams, none, _ = generate(False)
    ours, streams, overlapped, steps = generate(True)
    assert none == 0 and overlapped > steps // 2
    assert sorted(ours) == sorted(plain) == [0, 1, 2, 4, 5]  # 3 was aborted
    for i, out in ours.items():
        assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs] == \
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in plain[i].outputs]
    aborted, plain_aborted = streams.pop((3, 0)), plain_streams.pop((3, 0))  # as far as it got: joined a step
    assert streams == plain_streams and 0 < len(aborted[1]) <= len(plain_aborted[1])  # later (a step was in
    assert aborted[1] == plain_aborted[1][: len(aborted[1])]  # flight when it came), the same tokens so far
    assert all(text == c.text and ids == c.token_ids for (i, k), (text, ids) in streams.items() if i in ours
               for c in [ours[i].outputs[k]])
    assert ours[0].outputs[0].token_ids == reference_greedy(model, ps[0], 40)
    assert ours[4].outputs[0].token_ids == ref[: ref.index(ref[12]) + 1]  # stopped on its token
    assert ours[5].outputs[0].logprobs is not None and len(ours[5].outputs[0].logprobs) == 8


def test_fp8_weights_engine_equals_recomputation_with_the_dequantized_weights(tok):
    # FP8 weights at inference: the engine over e4m3 linears and routed experts gives exactly the greedy tokens of
    # a plain model holding the dequantized values (both float32 here, MTP speculation on), at 1 byte per weight.
    from dsv3.fp8.format import dequantize_blocks
    from dsv3.fp8.inference import Fp8WeightExperts, Fp8WeightLinear
    from dsv3.model.moe import Experts
    cfg = ModelConfig.from_hf_dict({"model_type": "deepseek_v3", **small_v3(vocab_size=576),
                                    "num_nextn_predict_layers": 1})
    model, ref = random_model(cfg, std=0.2), random_model(cfg, std=0.2)
    decoder = [(n, type(m)) for n, m in model.named_modules() if n.startswith(("layers", "mtp"))]
    linears = [n for n, t in decoder if t is torch.nn.Linear and not n.endswith(("kv_b_proj", "eh_proj"))]
    experts = [n for n, t in decoder if t is Experts]
    llm = LLM(model, tok, config=EngineConfig(block_size=16, num_blocks=64, speculative_tokens=1), fp8_weights=True)
    assert linears and experts
    with torch.no_grad():
        for name in linears:
            m = model.get_submodule(name)
            assert isinstance(m, Fp8WeightLinear) and m.weight.element_size() == 1
            ref.get_submodule(name).weight.copy_(dequantize_blocks(m.weight, m.weight_scale_inv))
        for name in experts:
            m = model.get_submodule(name)
            assert isinstance(m, Fp8WeightExperts) and m.gate_up_proj.element_size() == m.down_proj.element_size() == 1
            for w, s in (("gate_up_proj", m.gate_up_proj_scale_inv), ("down_proj", m.down_proj_scale_inv)):
                getattr(ref.get_submodule(name), w).copy_(dequantize_blocks(getattr(m, w), s))
    ps = prompts(2, [9, 41], seed=3)
    done, ids = run(llm.engine, {0: [(p, SamplingParams(max_tokens=24, logprobs=0, **GREEDY)) for p in ps]})
    for rid, out in done.items():
        toks = out.outputs[0].token_ids
        assert toks == reference_greedy(ref, ids[rid], 24)
        with torch.no_grad():  # and each token's log-probability, which a wrong scale anywhere would move
            lp = ref(torch.tensor([ids[rid] + toks])).logits[0, len(ids[rid]) - 1:-1].log_softmax(-1)
        want = lp.gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert torch.allclose(torch.tensor([t.logprob for t in out.outputs[0].logprobs]), want, atol=1e-4)
    assert llm.engine.drafted > 0
