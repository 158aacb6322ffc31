"""Request bodies of the API (docs/api.md) as pydantic models, and the error shape (docs/api.md#errors).

Field rules live here as constraints, so FastAPI rejects a bad request before it reaches the engine: a value out
of its range is a 422 naming the parameter; a malformed body or a wrong shape is a 400. A request body names only
fields of the API (docs/api.md#request-fields): an unknown top-level field is a 400 naming it, as OpenAI answers,
so a misspelt or unsupported option never passes unnoticed. Fields of OpenAI's API that would change the output
but that this server cannot honour are declared here and refused in inputs.py; fields that change nothing in the
output (`user`, `metadata`, `store`, ...) are accepted. Nested objects (messages, tools) stay lenient: clients
send back the assistant messages they received, with fields such as `refusal` or `annotations`.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16  # DeepSeek: up to 16 stop strings
MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

Penalty = Annotated[float, Field(ge=-2, le=2)]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI's random padding of chunks: never sent here; true is refused


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name of system
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    prefix: bool | None = None  # Chat Prefix Completion (last assistant message only)
    reasoning_content: str | None = None  # accepted, never fed back to the model

    @field_validator("role")
    @classmethod
    def _system(cls, v):
        return "system" if v == "developer" else v  # the chat template knows system messages only

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        # OpenAI's content parts: only text parts can reach a text model.
        if isinstance(v, list):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            return "".join(p["text"] for p in v)
        return v


class FunctionDef(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not _TOOL_NAME.match(v):
            raise ValueError("function names are 1-64 characters of a-z, A-Z, 0-9, '_' and '-'")
        return v


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[str, str]


class JSONSchema(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # true: the schema must meet OpenAI's strict rules (docs/api.md#structured-outputs)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type 'json_schema', and only with it")
        return self


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias
    # vLLM's sampling extensions, under vLLM's names
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    # Accepted, and change nothing in the output: who asks, and what OpenAI would store or bill
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a routing hint; the prefix cache needs none

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        v = [v] if isinstance(v, str) else (v or [])
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name of max_tokens; both: the smaller
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (a grammar)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # OpenAI's fields that would change the output and that this server cannot honour: declared so the 400 names
    # each with its reason (inputs.py), whatever value it holds; null is taken as absent
    reasoning_effort: Any = None
    verbosity: Any = None
    prediction: Any = None
    audio: Any = None
    modalities: list[str] | None = None  # ["text"] is what the server does anyway
    web_search_options: Any = None
    moderation: Any = None
    functions: Any = None
    function_call: Any = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        if any(m.prefix for m in self.messages[:-1]):
            raise ValueError("prefix: true is allowed only on the last message")
        if self.messages[-1].prefix and self.messages[-1].role != "assistant":
            raise ValueError("prefix: true needs the last message to have role 'assistant'")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)  # only best_of == n (the default): ranking extra samples is not done

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v
