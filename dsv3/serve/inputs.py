"""A validated request as the engine's inputs: prompt ids (chat template, Chat Prefix Completion, FIM, token ids),
the token budget, `SamplingParams` and the grammar that constrains decoding (docs/api.md).

Every request field that changes what the engine does is read here, in the order the checks run: a request that
breaks several rules gets the error of the first.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.infer.sampler import SamplingParams
from dsv3.infer.structured import Grammar
from dsv3.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from dsv3.serve.service import Service
from dsv3.tokenizer import THINK, fim_prompt


# OpenAI's fields that would change the output and that this server cannot honour (docs/api.md#request-fields)
UNSUPPORTED = {
    "reasoning_effort": "the model's reasoning cannot be made longer or shorter",
    "verbosity": "the answer's length can be bounded only by max_completion_tokens",
    "prediction": "Predicted Outputs are not implemented",
    "audio": "the model reads and writes text only",
    "web_search_options": "the server has no web search",
    "moderation": "the server runs no moderation model",
    "functions": "the deprecated function-calling fields are not implemented; use tools",
    "function_call": "the deprecated function-calling fields are not implemented; use tool_choice",
}


def refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 naming the first field the request sets that would change the output and cannot be honoured."""
    for name, why in UNSUPPORTED.items():
        if getattr(req, name, None) is not None:
            raise APIError(400, f"{name} is not supported: {why}", param=name)
    if getattr(req, "modalities", None) not in (None, ["text"]):
        raise APIError(400, "modalities: only [\"text\"] is supported", param="modalities")
    if req.stream_options is not None and req.stream_options.include_obfuscation:
        raise APIError(400, "stream_options.include_obfuscation is not supported: chunks are never padded",
                       param="stream_options.include_obfuscation")
    if getattr(req, "best_of", None) not in (None, req.n):
        raise APIError(400, f"best_of={req.best_of} is not supported: only best_of equal to n ({req.n}), as every "
                            "sample is returned", param="best_of")


def asked_tokens(req: ChatCompletionRequest | CompletionRequest) -> tuple[int | None, str]:
    """(the completion's token limit the request asks for, the field that asks it): the smaller of `max_tokens`
    and `max_completion_tokens` when both are given; (None, "max_tokens") when neither is."""
    asked = [(v, k) for k in ("max_tokens", "max_completion_tokens") if (v := getattr(req, k, None)) is not None]
    return min(asked) if asked else (None, "max_tokens")


def token_budget(prompt_len: int, asked: int | None, cap: int, max_len: int, param: str = "max_tokens") -> int:
    """max_tokens for the engine: as asked (in the field `param`), if prompt and answer fit the context of
    `max_len` tokens (else 400); when not asked, what is left of the context, at most `cap`."""
    left = max_len - prompt_len
    if asked is None:
        if left < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context length is {max_len}")
        return min(cap, left)
    if prompt_len + asked > max_len:
        raise APIError(400, f"the prompt has {prompt_len} tokens and {param} is {asked}: together over the "
                            f"model's context length of {max_len} tokens", param=param)
    return asked


def sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None,
                    max_n: int, vocab_size: int) -> SamplingParams:
    """The request's sampling fields as SamplingParams (no grammar yet); n over `max_n` is a 422, a token id
    outside the vocabulary (logit_bias, stop_token_ids) a 400."""
    if req.n > max_n:
        raise APIError(422, f"n={req.n} is over this server's limit of {max_n}", param="n")
    bias = {}
    for key, b in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                           param="logit_bias")
        bias[int(key)] = b
    if req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens={req.min_tokens} is over the completion's limit of {max_tokens} tokens",
                       param="min_tokens")
    if any(t >= vocab_size for t in req.stop_token_ids or []):
        raise APIError(400, f"stop_token_ids: token ids are 0 to {vocab_size - 1}", param="stop_token_ids")
    return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                          repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                          presence_penalty=req.presence_penalty, logit_bias=bias, max_tokens=max_tokens,
                          min_tokens=req.min_tokens, stop=req.stop or [],
                          stop_token_ids=req.stop_token_ids or [], seed=req.seed, logprobs=logprobs,
                          ignore_eos=req.ignore_eos)


# ---- chat completions -------------------------------------------------------------------------------------------
@dataclass
class ChatInputs:
    ids: list[int]  # the prompt: the chat template over messages and tools
    params: SamplingParams  # with its grammar, if decoding is constrained
    tools: list[dict]  # offered to the model (none under tool_choice "none"): their calls are parsed out
    thinking: bool  # the prompt ends inside an open <think>: the output starts as reasoning


def chat_inputs(service: Service, req: ChatCompletionRequest) -> ChatInputs:
    tok = service.tokenizer
    refuse_unsupported(req)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools, choice = _tools(req)
    answer = req.response_format.type if req.response_format else "text"
    if answer != "text" and tools:
        raise APIError(400, f"response_format {answer} cannot be combined with tools", param="response_format")
    try:
        ids = tok.apply_chat_template(messages, tools=tools or None, tokenize=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    # What the rendered prompt opened, not what the template could do: the grammar lets the output reason first
    # only when the prompt ends inside <think> (an R1 template's generation prompt).
    thinking = service.reasoning and tok.decode(ids[-8:]).rstrip().endswith(THINK)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    asked, field = asked_tokens(req)
    budget = token_budget(len(ids), asked, service.config.default_max_tokens, service.max_len, field)
    params = sampling_params(req, budget, logprobs, service.config.max_n, service.vocab_size)
    params.grammar = _answer_grammar(service, req, thinking) if answer != "text" else \
        _tool_grammar(service, tools, choice, req.parallel_tool_calls is not False, thinking)
    return ChatInputs(ids, params, tools, thinking)


def _tools(req: ChatCompletionRequest) -> tuple[list[dict], str | dict | None]:
    """(tools offered, tool_choice); a tool_choice that needs tools, or names one that is not there, is a 400."""
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if choice != "none" else []
    if choice not in (None, "none", "auto") and not tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
    if isinstance(choice, dict) and choice["function"].get("name") not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {choice['function'].get('name')!r}, which is not among the tools",
                       param="tool_choice")
    return tools, choice


def _answer_grammar(service: Service, req: ChatCompletionRequest, thinking: bool) -> Grammar:
    """JSON mode (any JSON object) or Structured Outputs (JSON matching the request's schema)."""
    fmt = req.response_format
    if fmt.type == "json_object":
        return service.grammars.json_object(thinking)
    param, js = "response_format.json_schema.schema", fmt.json_schema
    schema = js.schema_ if js.schema_ is not None else {"type": "object"}
    if js.strict and (problem := strict_schema_problem(schema)):
        raise APIError(400, f"{param}: strict is true, but {problem}", param=param)
    try:
        return service.grammars.json_schema(schema, strict=bool(js.strict), reasoning=thinking)
    except Exception as e:  # a schema the grammar compiler cannot take
        raise APIError(400, f"{param}: cannot constrain output to this schema ({e})", param=param) from e


def _tool_grammar(service: Service, tools: list[dict], choice: str | dict | None, parallel: bool,
                  thinking: bool) -> Grammar | None:
    """Tool calls when a call is demanded, at most one is allowed (parallel_tool_calls false), or a tool is strict
    (its arguments must match its schema). Plain `auto` tools are parsed, not constrained."""
    strict = [t["function"] for t in tools if t["function"].get("strict")]
    if not tools or (choice in (None, "auto") and parallel and not strict):
        return None
    for f in strict:
        if problem := strict_schema_problem(f.get("parameters") or {"type": "object", "properties": {}}):
            raise APIError(400, f"tools: function {f['name']!r} is strict, but {problem}", param="tools")
    try:
        return service.grammars.tool_calls(tools, choice or "auto", thinking, parallel)
    except Exception as e:  # a parameters schema the grammar compiler rejects
        raise APIError(400, f"tools: cannot constrain calls to these parameter schemas ({e})", param="tools") from e


def strict_schema_problem(schema: dict, at: str = "#") -> str | None:
    """What keeps `schema` from OpenAI's strict mode (docs/api.md#structured-outputs), or None: the root is an
    object, and every object lists all its properties as required and sets additionalProperties to false."""
    if at == "#" and schema.get("type") != "object":
        return "the root of a strict schema must be an object ({\"type\": \"object\", ...})"
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False:
            return f"the object at {at} must set additionalProperties to false"
        if missing := [p for p in props if p not in (schema.get("required") or [])]:
            return f"the object at {at} must list every property as required (missing: {', '.join(missing)})"
    subs = [(f"{at}/properties/{k}", v) for k, v in (schema.get("properties") or {}).items()]
    for key in ("$defs", "definitions"):
        subs += [(f"{at}/{key}/{k}", v) for k, v in (schema.get(key) or {}).items()]
    for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
        subs += [(f"{at}/{key}/{i}", v) for i, v in enumerate(schema.get(key) or [])]
    if isinstance(schema.get("items"), dict):
        subs.append((f"{at}/items", schema["items"]))
    return next((p for path, sub in subs if isinstance(sub, dict) and (p := strict_schema_problem(sub, path))), None)


# ---- text completions -----------------------------------------------------------------------------------------
def completion_inputs(service: Service, req: CompletionRequest) -> tuple[list[tuple[list[int], str]],
                                                                          list[SamplingParams]]:
    """One engine request per prompt: the prompts as (ids, text echoed before the choice), and their params.
    A `suffix` makes a text prompt a fill-in-the-middle prompt (docs/api.md#fim-completions)."""
    raw, cfg, tok = req.prompt, service.config, service.tokenizer
    refuse_unsupported(req)
    prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    if len(prompts) > cfg.max_n:
        raise APIError(422, f"{len(prompts)} prompts is over this server's limit of {cfg.max_n}", param="prompt")
    jobs = []
    for p in prompts:
        if isinstance(p, str):
            text = fim_prompt(p, req.suffix) if req.suffix is not None else p
            jobs.append((tok.encode(text, add_bos=True), p))
            continue
        if not p:
            raise APIError(422, "a token-id prompt must not be empty", param="prompt")
        if req.suffix is not None:
            raise APIError(400, "suffix (FIM) needs the prompt as text", param="suffix")
        if any(not 0 <= t < service.vocab_size for t in p):
            raise APIError(422, "prompt token ids must be in the vocabulary", param="prompt")
        jobs.append((list(p), tok.decode(p)))
    cap = cfg.fim_max_tokens if req.suffix is not None else cfg.default_max_tokens
    params = [sampling_params(req, token_budget(len(ids), req.max_tokens, cap, service.max_len), req.logprobs,
                              cfg.max_n, service.vocab_size) for ids, _ in jobs]
    return jobs, params
