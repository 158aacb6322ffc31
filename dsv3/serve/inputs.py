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


def token_budget(prompt_len: int, asked: int | None, cap: int, max_len: int) -> int:
    """max_tokens for the engine: as asked, if prompt and answer fit the context of `max_len` tokens (else 400);
    when not asked, what is left of the context, at most `cap`."""
    left = max_len - prompt_len
    if asked is None:
        if left < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context length is {max_len}")
        return min(cap, left)
    if prompt_len + asked > max_len:
        raise APIError(400, f"the prompt has {prompt_len} tokens and max_tokens is {asked}: together over the "
                            f"model's context length of {max_len} tokens", param="max_tokens")
    return asked


def sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None,
                    max_n: int) -> SamplingParams:
    """The request's sampling fields as SamplingParams (no grammar yet); n over `max_n` is a 422."""
    if req.n > max_n:
        raise APIError(422, f"n={req.n} is over this server's limit of {max_n}", param="n")
    return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                          frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                          stop=req.stop or [], seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos)


# ---- chat completions -------------------------------------------------------------------------------------------
@dataclass
class ChatInputs:
    ids: list[int]  # the prompt: the chat template over messages and tools
    params: SamplingParams  # with its grammar, if decoding is constrained
    tools: list[dict]  # offered to the model (none under tool_choice "none"): their calls are parsed out
    thinking: bool  # the prompt ends inside an open <think>: the output starts as reasoning


def chat_inputs(service: Service, req: ChatCompletionRequest) -> ChatInputs:
    tok = service.tokenizer
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools, choice = _tools(req)
    json_mode = req.response_format is not None and req.response_format.type == "json_object"
    if json_mode and tools:
        raise APIError(400, "response_format json_object cannot be combined with tools", param="response_format")
    try:
        ids = tok.apply_chat_template(messages, tools=tools or None, tokenize=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    thinking = service.reasoning and tok.decode(ids[-8:]).rstrip().endswith(THINK)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    budget = token_budget(len(ids), req.max_tokens, service.config.default_max_tokens, service.max_len)
    params = sampling_params(req, budget, logprobs, service.config.max_n)
    params.grammar = _chat_grammar(service, json_mode, tools, choice)
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


def _chat_grammar(service: Service, json_mode: bool, tools: list[dict], choice: str | dict | None) -> Grammar | None:
    """Constrained decoding: JSON mode; tool calls when a call is demanded or a tool is strict (its arguments must
    match its schema). Plain `auto` tools are parsed, not constrained."""
    if json_mode:
        return service.grammars.json_object()
    if tools and (choice == "required" or isinstance(choice, dict) or any(t["function"].get("strict") for t in tools)):
        try:
            return service.grammars.tool_calls(tools, choice or "auto", service.reasoning)
        except Exception as e:  # a parameters schema the grammar compiler rejects
            raise APIError(400, f"tools: cannot constrain calls to these parameter schemas ({e})",
                           param="tools") from e
    return None


# ---- text completions -----------------------------------------------------------------------------------------
def completion_inputs(service: Service, req: CompletionRequest) -> tuple[list[tuple[list[int], str]],
                                                                          list[SamplingParams]]:
    """One engine request per prompt: the prompts as (ids, text echoed before the choice), and their params.
    A `suffix` makes a text prompt a fill-in-the-middle prompt (docs/api.md#fim-completions)."""
    raw, cfg, tok = req.prompt, service.config, service.tokenizer
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
                              cfg.max_n) for ids, _ in jobs]
    return jobs, params
