"""A request's engine inputs without an app: the token budget against the context (docs/api.md#chat-completions),
the request's sampling fields as SamplingParams, every field of OpenAI's APIs honoured, accepted or refused by
name (docs/api.md#request-fields), and OpenAI's strict-schema rules (docs/api.md#structured-outputs)."""
import pytest

from dsv3.serve.inputs import asked_tokens, refuse_unsupported, sampling_params, strict_schema_problem, token_budget
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
    p = sampling_params(req, 7, 2, max_n=2, vocab_size=100)
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.frequency_penalty, p.presence_penalty) == \
        (2, 0.5, 0.9, 7, 0.25, -1)
    assert (p.stop, p.seed, p.logprobs, p.ignore_eos, p.grammar) == (["##"], 3, 2, True, None)
    plain = sampling_params(CompletionRequest(model="m", prompt="x"), 16, None, max_n=1, vocab_size=100)
    assert (plain.n, plain.temperature, plain.top_p, plain.stop, plain.seed, plain.logprobs) == \
        (1, 1.0, 1.0, [], None, None)
    assert error(sampling_params, req, 7, None, 1, 100) == (422, "n", "n=2 is over this server's limit of 1")


def test_max_completion_tokens_bounds_and_the_smaller_of_both_wins():
    msgs = [{"role": "user", "content": "hi"}]
    assert asked_tokens(ChatCompletionRequest(model="m", messages=msgs)) == (None, "max_tokens")
    assert asked_tokens(ChatCompletionRequest(model="m", messages=msgs, max_completion_tokens=16)) == \
        (16, "max_completion_tokens")
    assert asked_tokens(ChatCompletionRequest(model="m", messages=msgs, max_tokens=9, max_completion_tokens=16)) == \
        (9, "max_tokens")
    assert asked_tokens(ChatCompletionRequest(model="m", messages=msgs, max_tokens=90, max_completion_tokens=16)) \
        == (16, "max_completion_tokens")
    assert error(token_budget, 1000, 25, 4096, 1024, "max_completion_tokens")[:2] == (400, "max_completion_tokens")


# The request fields of OpenAI's current APIs, as the official client (an independent reference) declares them,
# each with what the server does with it: honoured, accepted (it changes nothing in the output), or refused.
REFUSED = {"reasoning_effort": "high", "verbosity": "low", "prediction": {"type": "content", "content": "x"},
           "audio": {"voice": "alloy", "format": "mp3"}, "modalities": ["text", "audio"],
           "web_search_options": {}, "functions": [{"name": "f"}], "function_call": "auto",
           "moderation": {"model": "omni-moderation-latest"}}
ACCEPTED = {"user": "u1", "metadata": {"k": "v"}, "store": True, "service_tier": "auto", "safety_identifier": "s",
            "prompt_cache_key": "k", "prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "1h"},
            "modalities": ["text"]}


def test_every_openai_chat_field_is_honoured_accepted_or_refused_by_name():
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase
    openai_fields = set(CompletionCreateParamsBase.__annotations__)
    ours = set(ChatCompletionRequest.model_fields)
    assert openai_fields <= ours, f"fields of OpenAI's API this server does not classify: {openai_fields - ours}"
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for name, value in REFUSED.items():
        status, param, message = error(refuse_unsupported, ChatCompletionRequest(**base, **{name: value}))
        assert (status, param) == (400, name) and message.startswith(name)
    refuse_unsupported(ChatCompletionRequest(**base, **ACCEPTED))  # no error
    for name in ("reasoning_effort", "audio"):
        refuse_unsupported(ChatCompletionRequest(**base, **{name: None}))  # null is absent


def test_every_openai_completion_field_is_honoured_or_refused_by_name():
    from openai.types.completion_create_params import CompletionCreateParamsBase
    assert set(CompletionCreateParamsBase.__annotations__) <= set(CompletionRequest.model_fields)
    assert error(refuse_unsupported, CompletionRequest(model="m", prompt="x", best_of=3))[:2] == (400, "best_of")
    refuse_unsupported(CompletionRequest(model="m", prompt="x", best_of=2, n=2))


def test_an_unknown_field_is_a_400_naming_it():
    from pydantic import ValidationError

    from dsv3.serve.openai_format import validation_error
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_token=5)
    err = validation_error(e.value.errors())
    assert (err.status, err.param, err.message) == (400, "max_token", "unrecognized request argument supplied: "
                                                                      "max_token")
    # OpenAI's newer name of the system role is the system role.
    assert ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": "x"}]).messages[0].role == \
        "system"
    # Messages stay lenient: clients send back the assistant messages they received, with more fields.
    ChatCompletionRequest(model="m", messages=[{"role": "assistant", "content": "a", "refusal": None,
                                                "annotations": []}, {"role": "user", "content": "b"}])


def test_logit_bias_and_vllm_extensions_reach_sampling_params():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], logit_bias={"7": -100,
                                "12": 2.5}, top_k=5, min_p=0.1, repetition_penalty=1.1, min_tokens=2,
                                stop_token_ids=[3])
    p = sampling_params(req, 8, None, max_n=1, vocab_size=100)
    assert (p.logit_bias, p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.stop_token_ids) == \
        ({7: -100.0, 12: 2.5}, 5, 0.1, 1.1, 2, [3])
    bad = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], logit_bias={"100": 1})
    assert error(sampling_params, bad, 8, None, 1, 100) == (
        400, "logit_bias", "logit_bias: '100' is not a token id of this model (0 to 99)")
    assert error(sampling_params, req, 1, None, 1, 100)[:2] == (400, "min_tokens")


@pytest.mark.parametrize("schema, problem", [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False},
     None),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
     "the object at # must set additionalProperties to false"),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"],
      "additionalProperties": False}, "the object at # must list every property as required (missing: b)"),
    ({"type": "array", "items": {"type": "string"}}, "the root of a strict schema must be an object"),
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"], "additionalProperties": False,
      "$defs": {"P": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}},
     "the object at #/$defs/P must set additionalProperties to false"),
    ({"type": "object", "properties": {"l": {"type": "array", "items": {"anyOf": [
        {"type": "object", "properties": {}, "additionalProperties": False}, {"type": "object", "properties": {
            "y": {"type": "string"}}, "additionalProperties": False}]}}}, "required": ["l"],
      "additionalProperties": False},
     "the object at #/properties/l/items/anyOf/1 must list every property as required (missing: y)"),
])
def test_strict_schemas_follow_openais_rules(schema, problem):
    got = strict_schema_problem(schema)
    assert got == problem if problem is None or not problem.startswith("the root") else got.startswith(problem)
