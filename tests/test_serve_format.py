"""The server's OpenAI-format helpers without an app, against bodies written out by hand from the API's contract
(docs/api.md): usage, logprobs and their text offsets, validation errors, SSE framing, stream deltas."""
import json

from dsv3.infer.engine import CompletionOutput, RequestOutput
from dsv3.infer.sampler import TokenLogprobs
from dsv3.serve import openai_format as fmt
from dsv3.serve.parsing import OutputParser
from dsv3.tokenizer import THINK_END

TEXTS = {0: "Ro", 1: "meo", 2: " is", 3: "é", 4: THINK_END}


class Vocab:
    """A tokenizer stand-in: token i is the text TEXTS[i]; encode counts one token per word."""

    def decode(self, ids):
        return "".join(TEXTS[i] for i in ids)

    def encode(self, text):
        return text.split()


def output(index, text, token_ids, delta="", finish=None, logprobs=None):
    return CompletionOutput(index, text, token_ids, delta_text=delta, delta_token_ids=token_ids[-1:] if delta else [],
                            finish_reason=finish, logprobs=logprobs)


def request(outputs, cached=0, finished=True):
    return RequestOutput("r", [], outputs, num_cached_tokens=cached, finished=finished)


def test_usage_sums_prompts_completions_and_cache_hits():
    a = request([output(0, "", [1, 2, 3]), output(1, "", [4, 5, 6, 7])], cached=4)
    b = request([output(0, "", [1, 2, 3, 4, 5])], cached=0)
    assert fmt.usage([(10, a), (6, b)], reasoning_tokens=2) == {
        "prompt_tokens": 16, "completion_tokens": 12, "total_tokens": 28,
        "prompt_cache_hit_tokens": 4, "prompt_cache_miss_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}


def test_completion_logprobs_offsets_count_characters_after_the_echo():
    entries = [TokenLogprobs(0, -0.5, [(0, -0.5), (3, -1.5)]), TokenLogprobs(1, -0.25, [(1, -0.25)]),
               TokenLogprobs(3, -2.0, [(2, -1.0)])]
    # "ROMEO." echoed (6 characters), then "Ro" at 6, "meo" at 8, "é" (one character, two bytes) at 11.
    assert fmt.completion_logprobs(entries, 6, Vocab()) == {
        "tokens": ["Ro", "meo", "é"], "token_logprobs": [-0.5, -0.25, -2.0],
        "top_logprobs": [{"Ro": -0.5, "é": -1.5}, {"meo": -0.25}, {" is": -1.0}], "text_offset": [6, 8, 11]}


def test_chat_logprobs_carry_the_utf8_bytes_of_each_token():
    got = fmt.chat_logprobs([TokenLogprobs(3, -0.1, [(3, -0.1), (2, -3.0)])], Vocab())
    e_acute = {"token": "é", "logprob": -0.1, "bytes": [0xC3, 0xA9]}
    assert got == {"content": [e_acute | {"top_logprobs": [
        e_acute, {"token": " is", "logprob": -3.0, "bytes": [32, 105, 115]}]}]}


def test_validation_errors_are_400_for_shape_and_422_for_a_value_naming_it():
    def err(*errors):
        e = fmt.validation_error(list(errors))
        return e.status, e.param, e.message
    assert err({"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error"}) == \
        (400, None, "the request body is not valid JSON")
    assert err({"type": "less_than_equal", "loc": ("body", "temperature"), "msg": "Input should be <= 2"}) == \
        (422, "temperature", "temperature: Input should be <= 2")
    assert err({"type": "literal_error", "loc": ("body", "messages", 0, "role"), "msg": "bad role"},
               {"type": "missing", "loc": ("body", "model"), "msg": "Field required"}) == \
        (422, "messages.0.role", "messages.0.role: bad role")  # the first error is reported
    assert err({"type": "missing", "loc": ("body", "model"), "msg": "Field required"}) == \
        (400, "model", "model: Field required")  # a missing field is the wrong shape
    assert err({"type": "value_error", "loc": ("body",), "msg": "Value error, prefix"}) == \
        (400, None, "Value error, prefix")  # a rule over the whole request: no parameter to name


def test_sse_framing_of_chunks_keep_alives_and_errors():
    head = {"id": "chatcmpl-1", "created": 5, "model": "m", "system_fingerprint": "fp"}
    assert fmt.chat_chunk(head, [], True, usage={"total_tokens": 1}) == (
        'data: {"id": "chatcmpl-1", "created": 5, "model": "m", "system_fingerprint": "fp", '
        '"object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 1}}\n\n')
    assert fmt.chat_chunk(head, [{"delta": "é"}], True).endswith('"choices": [{"delta": "é"}], "usage": null}\n\n')
    assert fmt.chat_chunk(head, [], False).endswith('"choices": []}\n\n')  # no usage field without include_usage
    assert fmt.sse({"text": "é"}) == 'data: {"text": "\\u00e9"}\n\n'  # text completions: ASCII-escaped
    assert (fmt.KEEP_ALIVE, fmt.DONE) == (": keep-alive\n\n", "data: [DONE]\n\n")
    event = fmt.error_event(RuntimeError("boom"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}


def test_chat_deltas_send_new_text_then_the_finish_and_each_logprob_once():
    parsers, sent = [OutputParser(False), OutputParser(False)], [0, 0]
    lp = [TokenLogprobs(0, -0.5, []), TokenLogprobs(1, -0.25, [])]
    step1 = request([output(0, "Ro", [0], "Ro", logprobs=lp[:1]), output(1, "", [])], finished=False)
    choices, finished = fmt.chat_deltas(step1, parsers, sent, Vocab())
    assert finished == [] and choices == [{"index": 0, "delta": {"content": "Ro"}, "finish_reason": None,
                                           "logprobs": {"content": [{"token": "Ro", "logprob": -0.5, "bytes": [82, 111],
                                                                     "top_logprobs": []}]}}]
    step2 = request([output(0, "Romeo", [0, 1], "meo", finish="length", logprobs=lp), output(1, "", [], finish="stop")])
    choices, finished = fmt.chat_deltas(step2, parsers, sent, Vocab())
    assert choices == [{"index": 0, "delta": {"content": "meo"}, "finish_reason": None, "logprobs": {
        "content": [{"token": "meo", "logprob": -0.25, "bytes": [109, 101, 111], "top_logprobs": []}]}}]
    assert finished == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"},
                        {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert sent == [2, 0]


def test_a_chat_completion_splits_reasoning_and_counts_its_tokens():
    head = {"id": "chatcmpl-1"}
    last = request([output(0, f"two words{THINK_END}Romeo", [0, 1, 4, 0, 1], finish="stop")], cached=3)
    body = fmt.chat_completion(head, last, [OutputParser(True, thinking=True)], True, 7, Vocab())
    assert body == {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "Romeo", "reasoning_content": "two words"},
        "finish_reason": "stop", "logprobs": None}], "usage": {
        "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "prompt_cache_hit_tokens": 3,
        "prompt_cache_miss_tokens": 4, "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 2}}}
    no_reasoning = fmt.chat_completion(head, last, [OutputParser(False)], False, 7, Vocab())["choices"][0]["message"]
    assert no_reasoning == {"role": "assistant", "content": f"two words{THINK_END}Romeo"}


def test_a_choice_that_stopped_after_tool_calls_finishes_with_tool_calls():
    assert fmt.finish_reason(output(0, "", [], finish="stop"), ["call"]) == "tool_calls"
    assert fmt.finish_reason(output(0, "", [], finish="length"), ["call"]) == "length"  # cut: not a finished call
    assert fmt.finish_reason(output(0, "", [], finish="stop"), []) == "stop"


def test_text_completion_numbers_choices_per_prompt_and_echoes():
    prompts = [([9, 9], "AB"), ([9], "C")]
    lasts = [request([output(0, "x", [1], finish="stop"), output(1, "yz", [1, 2], finish="length")]),
             request([output(0, "w", [1], finish="stop", logprobs=[TokenLogprobs(1, -1.0, [])])], cached=1)]
    body = fmt.text_completion({"id": "cmpl-1"}, prompts, lasts, True, 2, Vocab())
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == \
        [(0, "ABx", "stop"), (1, "AByz", "length"), (2, "Cw", "stop")]
    assert body["choices"][2]["logprobs"]["text_offset"] == [1]  # after the echoed "C"
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 4
    assert body["usage"]["prompt_cache_hit_tokens"] == 1 and body["object"] == "text_completion"


def test_completion_deltas_lead_a_choice_with_the_echo_once():
    sent = {}
    lp = [TokenLogprobs(0, -0.5, []), TokenLogprobs(2, -0.75, [])]
    first = fmt.completion_deltas(request([output(0, "Ro", [0], "Ro", logprobs=lp[:1])], finished=False), 1, 3,
                                  "P:", sent, Vocab())
    assert first == [{"index": 3, "text": "P:Ro", "finish_reason": None, "logprobs": {
        "tokens": ["Ro"], "token_logprobs": [-0.5], "top_logprobs": [{}], "text_offset": [0]}}]
    last = fmt.completion_deltas(request([output(0, "Ro is", [0, 2], " is", finish="stop", logprobs=lp)]), 1, 3,
                                 "P:", sent, Vocab())
    assert last == [{"index": 3, "text": " is", "finish_reason": "stop", "logprobs": {
        "tokens": [" is"], "token_logprobs": [-0.75], "top_logprobs": [{}], "text_offset": [0]}}]
    assert fmt.completion_deltas(request([output(0, "", [])], finished=False), 0, 3, "", {}, Vocab()) == []
