"""Post-training: SFT masking and packing against a plain forward, the tasks' verifiers against Python's own
arithmetic, reward plumbing, and the GRPO trainer's log-probs, weight sync and bad-input errors."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import random_model, small_v3
from dsv3 import ModelConfig, save_model
from dsv3.data.bpe import train_bpe
from dsv3.rl.grpo import GRPOConfig, GRPOTrainer
from dsv3.rl.rewards import RewardError, RewardSet, build_rewards
from dsv3.rl.sft import IGNORE, pack, token_nll, tokenize_example
from dsv3.rl.tasks import Arithmetic, Countdown, final_answer, get_task, split_of, well_formed
from dsv3.tokenizer import THINK, THINK_END

TEXT = ["What is 12 + 34? <think> 2+4=6, carry 0, so far 6 </think> 46 " * 4,
        "The king speaks to the queen, and the ghost walks upon the wall at night. " * 3]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 512)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    cfg = ModelConfig.from_hf_dict({"model_type": "deepseek_v3", **small_v3(vocab_size=576),
                                    "num_nextn_predict_layers": 0})
    path = tmp_path_factory.mktemp("policy")
    save_model(random_model(cfg, std=0.2), path)
    tok.save(path)
    return path


def chat_example():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 34?"},
        {"role": "assistant", "content": f"{THINK}add{THINK_END}46"},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": f"{THINK}2+0{THINK_END}2"}]}


def test_sft_targets_are_exactly_the_assistant_turns_with_their_eos(tok):
    ids, train = tokenize_example(chat_example(), tok)
    spans, cur = [], []
    for i, t in zip(ids, train):
        if t:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur) if cur else None
    # The first turn as later prompts show it (reasoning dropped, R1), the last with its reasoning.
    assert [tok.decode(s) for s in spans] == [f"46{tok.eos_token}", f"{THINK}2+0{THINK_END}2{tok.eos_token}"]
    full = tok.apply_chat_template(chat_example()["messages"][:4])  # the prompt of the last turn
    assert tok.decode(ids[:len(ids) - len(spans[-1])]) == full


def test_sft_loss_is_mean_nll_over_assistant_tokens_and_prompt_tokens_get_no_gradient(tok, ckpt):
    from dsv3 import load_model
    model = load_model(ckpt)
    examples = [tokenize_example(chat_example(), tok),
                tokenize_example({"prompt": "What is 3 + 4?", "completion": "7"}, tok)]
    row = pack(examples, 128, tok.eos_id)
    assert len(row) == 1
    batch = row[0]
    nll, _ = token_nll(model, batch, autocast=False)
    n = int((batch.labels != IGNORE).sum())
    assert n == sum(sum(t) for _, t in examples)
    # Reference: each example alone through a plain forward, NLL at its flagged tokens, averaged.
    ref, count = 0.0, 0
    for x, t in examples:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([x])).logits[0].double(), -1)
        for j in range(1, len(x)):
            if t[j]:
                ref -= float(logp[j - 1, x[j]])
                count += 1
    assert count == n
    assert abs(float(nll.detach()) / n - ref / count) < 1e-4  # packing leaks nothing across examples
    # Gradient of the SFT loss w.r.t. the logits: exactly zero wherever the next token is not the assistant's.
    logits = model(batch.input_ids, doc_ids=batch.doc_ids).logits
    logits.retain_grad()
    from dsv3.kernels.cross_entropy import cross_entropy
    (cross_entropy(logits.flatten(0, 1), batch.labels.flatten()).sum() / n).backward()
    no_target = batch.labels[0] == IGNORE
    assert torch.all(logits.grad[0, no_target] == 0)
    assert torch.all(logits.grad[0, ~no_target].abs().sum(-1) > 0)


def test_bad_sft_examples_name_the_problem(tok):
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_example({"messages": [{"role": "user", "content": "hi"}]}, tok)
    with pytest.raises(ValueError, match="'messages' or 'prompt'"):
        tokenize_example({"text": "hi"}, tok)


def test_arithmetic_reasoning_and_answers_agree_with_python():
    task = Arithmetic(1, 4)
    for p in task.problems(300, seed=1):
        a, op, b = p.question.removeprefix("What is ").removesuffix("?").split()
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert p.answer == str(expected)
        solution = task.solution(p)
        assert well_formed(solution) and final_answer(solution) == p.answer
        # The last "so far" of the worked reasoning is the answer (leading zeros of a subtraction aside).
        assert int(solution.split(THINK_END)[0].rsplit("so far ", 1)[1]) == expected
        assert task.score(p.answer, p) == 1.0 and task.score(str(expected + 1), p) == 0.0


def test_chain_sum_rewrites_keep_the_value_and_end_at_the_answer():
    task = get_task("chain:2-5")
    for p in task.problems(200, seed=4):
        terms = [int(t) for t in p.question.removeprefix("What is ").removesuffix("?").split(" + ")]
        lines = task.solution(p).split(THINK_END)[0].removeprefix(THINK).strip().splitlines()
        assert [sum(int(t) for t in line.split(" + ")) for line in lines] == [sum(terms)] * len(terms)
        assert lines[0] == " + ".join(map(str, terms)) and lines[-1] == p.answer == str(sum(terms))


def test_countdown_verifier_checks_value_and_numbers_used():
    task = Countdown(4)
    for p in task.problems(100, seed=2):
        assert task.score(final_answer(task.solution(p)), p) == 1.0
        nums, target = p.data["numbers"], p.data["target"]
        assert eval(p.answer) == target  # the reference expression, by Python
        assert task.score(f"{target}", p) == 0.0  # numbers not used
        assert task.score(f"({p.answer})*1+{nums[0]}-{nums[0]}", p) == 0.0  # numbers used twice / extra ones
    p = task.problems(1, seed=3)[0]
    assert task.score("1/0", p) == 0.0 and task.score("__import__('os')", p) == 0.0


def test_heldout_problems_never_appear_in_training():
    for name in ("arithmetic", "countdown"):
        task = get_task(name)
        train = {p.question for p in task.problems(2000, seed=0)}
        test = {p.question for p in task.problems(200, seed=0, split="test")}
        assert not train & test and all(split_of(q) == "test" for q in test)


def test_a_small_task_gives_all_its_problems_when_asked_for_more():
    # chain:2-2 is a sum of two digits 1-9: 81 questions, split between train and test by hash.
    task = get_task("chain:2-2")
    train = task.problems(1000, seed=0, fewer_ok=True)
    questions = {p.question for p in train}
    test = {p.question for p in task.problems(1000, seed=0, split="test", fewer_ok=True)}
    assert len(questions) == len(train) and len(questions) + len(test) == 81 and not questions & test
    with pytest.raises(ValueError, match="fewer than 1000 distinct train problems"):
        task.problems(1000, seed=0)


def test_reasoning_gym_task_is_scored_by_reasoning_gym():
    pytest.importorskip("reasoning_gym")
    task = get_task("rg:basic_arithmetic")
    p = task.problems(5, seed=0)[0]
    assert task.score(p.answer, p) == 1.0 and task.score("no idea", p) == 0.0
    assert task.score(p.answer + "1", p) < 1.0  # reasoning-gym's own partial credit for a near miss


def test_format_rule():
    assert well_formed(f"{THINK}x{THINK_END} 3")
    task = get_task("chain")
    p = task.problems(1, seed=0)[0]
    direct = task.solution(p, reasoning=False)  # the demo's warm start answers some problems at once
    assert direct == f"{THINK}\n{THINK_END}\n{p.answer}" and well_formed(direct)
    assert task.score(final_answer(direct), p) == 1.0
    for bad in (f"{THINK}x{THINK_END}", "3", f"x{THINK}y{THINK_END}3", f"{THINK}{THINK}x{THINK_END}3"):
        assert not well_formed(bad)


def test_rewards_combine_skip_none_and_fail_loudly():
    task = get_task("arithmetic")
    p = task.problems(2, seed=0)
    good, bad = task.solution(p[0]), f"{THINK}x{THINK_END}nope"
    rs = build_rewards("accuracy=1,format=0.5", task, 64, 0)
    total, per = rs([good, bad], p[:1] + p[:1], [10, 10])
    assert total == [1.5, 0.5] and per["accuracy"] == [1.0, 0.0]

    def partial(c, probs, lengths):
        return [None, 2.0]
    total, _ = RewardSet({"f": (rs.functions["format"][0], 1.0), "p": (partial, 1.0)})([good, bad], p, [1, 1])
    assert total == [1.0, 3.0]  # None: left out of that sample's sum

    def broken(c, probs, lengths):
        raise KeyError("answer")
    for fn, msg in ((broken, "'broken' raised KeyError"), (lambda c, q, n: [1.0], "returned 1 scores"),
                    (lambda c, q, n: [float("nan"), 1.0], "finite"), (lambda c, q, n: [None, None], "no reward")):
        with pytest.raises(RewardError, match=msg):
            RewardSet({"broken": (fn, 1.0)})([good, bad], p, [1, 1])
    overlong = build_rewards("overlong", task, 100, 20).functions["overlong"][0]
    assert overlong(["", "", "", ""], p * 2, [80, 90, 100, 120]) == [0.0, -0.5, -1.0, -1.0]


def small_grpo(ckpt, tmp_path, **kw):
    cfg = dict(init_from=str(ckpt), task="arithmetic:1-1+", out=str(tmp_path / "grpo"), steps=2, prompts_per_step=2,
               group_size=4, max_tokens=8, lr=1e-3, eval_every=0, device="cpu", rewards="accuracy,format",
               overlong_filter=False)  # random weights never stop: every completion is truncated
    cfg.update(kw)
    return GRPOTrainer(GRPOConfig(**cfg))


def text_reward(completions, problems, lengths):  # a plugged-in reward with a signal on random weights
    return [len(c) % 5 / 4 for c in completions]


def test_grpo_logps_equal_a_plain_forward_of_each_sequence(ckpt, tmp_path):
    tr = small_grpo(ckpt, tmp_path, rewards="test_rl:text_reward", task="arithmetic:1-3+", prompts_per_step=4)
    ro = tr.rollout()
    assert len(ro.completions) == 16 and ro.rewards.std() > 0
    assert len({len(p) for p in ro.prompts}) > 1  # left padding is exercised
    rows = list(range(16))
    logp, _ = tr._logp(tr.model, *tr._batch(ro, rows))
    for i in rows:
        x = torch.tensor([ro.prompts[i] + ro.completions[i]])
        with torch.no_grad():
            ref = torch.log_softmax(tr.model(x).logits[0].double(), -1)  # temperature 1
        P = len(ro.prompts[i])
        for j, t in enumerate(ro.completions[i]):
            assert abs(float(logp[i, j].detach()) - float(ref[P - 1 + j, t])) < 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(beta=0.04, mu=2, minibatches=2, ref_refresh=1, aggregation="grpo"),
                                dict(dynamic_sampling=True, scale_rewards="none", aggregation="dr_grpo")])
def test_grpo_steps_update_the_engines_weights_and_log_every_metric(ckpt, tmp_path, kw):
    tr = small_grpo(ckpt, tmp_path, rewards="accuracy,format,test_rl:text_reward", **kw)
    before = [p.detach().clone() for p in tr.model.parameters()]
    version = tr.engine.weights_version
    rec = tr.train_step()
    for key in ("reward_mean", "reward_std", "reward_accuracy", "reward_format", "frac_zero_std", "entropy",
                "clip_low", "clip_high", "completion_len_mean", "completion_len_max", "truncated_frac",
                "time_generate", "time_update", "generate_tokens_per_s", "grad_norm"):
        assert key in rec, key
    assert ("kl" in rec) == bool(kw.get("beta"))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    # Among them the projections the engine runs fused: the optimizer (built before the engine fused the model)
    # still steps the model's own parameters.
    old = dict(zip((n for n, _ in tr.model.named_parameters()), before))
    for name in ("layers.0.self_attn.q_a_proj.weight", "layers.0.self_attn.kv_a_proj_with_mqa.weight"):
        assert not torch.equal(old[name], tr.model.get_parameter(name)), name
    assert tr.engine.weights_version == version + 1  # the prefix cache can no longer serve old latents
    assert tr.engine.model is tr.model  # CPU: the engine samples with the policy's own parameters


def test_grpo_rejects_bad_settings(ckpt, tmp_path):
    with pytest.raises(ValueError, match="group_size=1"):
        GRPOConfig(init_from=str(ckpt), group_size=1)
    with pytest.raises(ValueError, match="temperature"):
        GRPOConfig(init_from=str(ckpt), temperature=0)
    with pytest.raises(ValueError, match="unknown reward"):
        small_grpo(ckpt, tmp_path, rewards="accuracy,speling")


def test_cli_sft_then_eval_writes_json(ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    task = get_task("arithmetic:1-1+")
    data.write_text("".join(json.dumps({"messages": p.messages() + [{"role": "assistant",
                                        "content": task.solution(p)}]}) + "\n" for p in task.problems(20, 0)))
    run = [sys.executable, "-m", "dsv3"]
    out = subprocess.run([*run, "sft", "--init-from", str(ckpt), "--data", str(data), "--out", str(tmp_path / "s"),
                          "--steps", "2", "--batch-size", "2", "--seq-len", "128", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sft = json.loads(out.stdout.strip().splitlines()[-1])
    text = tmp_path / "t.txt"
    text.write_text(TEXT[1])
    out = subprocess.run([*run, "eval", sft["checkpoint"], "--task", "arithmetic:1-1+", "--n", "5", "--max-tokens",
                          "4", "--text", str(text), "--seq-len", "16", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["task"]["n"] == 5 and 0 <= res["task"]["accuracy"] <= 1 and res["perplexity"]["perplexity"] > 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = subprocess.run([*run, "sft", "--init-from", str(ckpt), "--data", str(empty), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no SFT examples" in out.stderr


class ScriptedEngine:
    """Stands in for the engine: returns fixed completions, so the filter of rejection sampling is what is tested."""

    def __init__(self, tok, texts):
        from dsv3.infer.engine import CompletionOutput, RequestOutput
        self.tokenizer, self.pending = tok, []
        self.make = lambda rid, i: RequestOutput(rid, [0], [CompletionOutput(j, t, [1] * 3, finish_reason=r)
                                                            for j, (t, r) in enumerate(texts[i])], 0, True)

    def add_request(self, prompt, params):
        self.pending.append(f"r{len(self.pending)}")
        return self.pending[-1]

    def has_unfinished(self):
        return bool(self.pending)

    def step(self):
        outs = [self.make(rid, int(rid[1:])) for rid in self.pending]
        self.pending = []
        return outs


def test_rejection_sampling_keeps_distinct_correct_well_formed_finished_samples(tok):
    from dsv3.rl.rft import rejection_sample
    task = get_task("chain:2-2")
    p = task.problems(2, seed=0)
    right, wrong = task.solution(p[0]), f"{THINK}guess{THINK_END}{int(p[0].answer) + 1}"
    texts = [[(right, "stop"), (right, "stop"), (wrong, "stop"), (p[0].answer, "stop"), (right, "length")],
             [(f"{THINK}x{THINK_END}{p[1].answer}", "stop")]]
    kept = rejection_sample(ScriptedEngine(tok, texts), task, p, k=5, temperature=1.0, max_tokens=32)
    second = f"{THINK}x{THINK_END}{p[1].answer}"
    assert kept == [{"messages": p[0].messages() + [{"role": "assistant", "content": right}]},
                    {"messages": p[1].messages() + [{"role": "assistant", "content": second}]}]


def test_sft_renders_tool_calls_into_the_assistant_targets(tok):
    from dsv3.tokenizer import TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    ids, train = tokenize_example({"messages": [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"}]}, tok)
    target = tok.decode([i for i, t in zip(ids, train) if t])
    assert target.startswith(TOOL_CALLS_BEGIN) and "add" in target and TOOL_CALLS_END in target
    assert target.endswith(f"2{tok.eos_token}") and target.count(tok.eos_token) == 2
    assert "1+1?" not in target and TOOL_OUTPUT_BEGIN not in target  # the user's and the tool's tokens are context
