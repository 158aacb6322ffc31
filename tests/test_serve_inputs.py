"""A request's engine inputs without an app: the token budget against the context (docs/api.md#chat-completions)
and the request's sampling fields as SamplingParams."""
import pytest

from dsv3.serve.inputs import sampling_params, token_budget
from dsv3.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest


def error(fn, *args):
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value.status, e.value.param, e.value.message


def test_an_asked_budget_is_kept_while_prompt_and_answer_fit_the_context():
    assert token_budget(1000, 24, 4096, 1024) == 24  # 1000 + 24 = 1024: exactly the context
    assert token_budget(10, 5000, 16, 8192) == 5000  # the cap bounds only a budget that was not asked
    assert error(token_budget, 1000, 25, 4096, 1024) == (
        400, "max_tokens", "the prompt has 1000 tokens and max_tokens is 25: together over the model's context "
                           "length of 1024 tokens")


def test_an_unasked_budget_is_what_the_context_leaves_up_to_the_cap():
    assert token_budget(1000, None, 4096, 1024) == 24
    assert token_budget(10, None, 16, 1024) == 16
    assert token_budget(1023, None, 16, 1024) == 1
    assert error(token_budget, 1024, None, 16, 1024) == (
        400, None, "the prompt has 1024 tokens; the model's context length is 1024")


def test_sampling_fields_map_to_sampling_params():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=2, temperature=0.5,
                                top_p=0.9, frequency_penalty=0.25, presence_penalty=-1, stop="##", seed=3,
                                ignore_eos=True)
    p = sampling_params(req, 7, 2, max_n=2)
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.frequency_penalty, p.presence_penalty) == \
        (2, 0.5, 0.9, 7, 0.25, -1)
    assert (p.stop, p.seed, p.logprobs, p.ignore_eos, p.grammar) == (["##"], 3, 2, True, None)
    plain = sampling_params(CompletionRequest(model="m", prompt="x"), 16, None, max_n=1)
    assert (plain.n, plain.temperature, plain.top_p, plain.stop, plain.seed, plain.logprobs) == \
        (1, 1.0, 1.0, [], None, None)
    assert error(sampling_params, req, 7, None, 1) == (422, "n", "n=2 is over this server's limit of 1")
