"""Request and response shapes of the OpenAI API subset the server speaks.

Requests are pydantic models (types are checked by FastAPI; values by SamplingParams and the
engine's capacity check). Responses are plain dicts in the OpenAI schema, plus a
`speculative_decoding` summary per response.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..engine import acceptance_length


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions. `null` is accepted wherever the OpenAI API allows
    it and means the default. Unknown fields are ignored (clients send many optional ones); known
    fields that would change the answer and are not implemented are refused, naming the field."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model
    max_tokens: int | None = None  # None: the rest of the context
    temperature: float | None = None  # None: OpenAI's default 1; 0 is greedy
    top_p: float | None = None
    top_k: int | None = None  # extension (as in vLLM): 0 or -1 = no limit
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # refused unless absent, null or a no-op value
    n: int | None = None
    logprobs: Union[bool, int, None] = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    def unsupported(self) -> str | None:
        """The first field asking for something this server does not do, or None."""
        no_ops = {"n": (None, 1), "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                  "repetition_penalty": (None, 1), "tool_choice": (None, "none", "auto")}
        for name in ("n", "best_of", "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "tools", "functions", "function_call", "tool_choice"):
            value = getattr(self, name)
            if value not in no_ops.get(name, (None, False, 0, {}, [])):
                return name
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return None

    def sampling(self) -> dict:
        """Sampling settings with nulls replaced by the defaults."""
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "top_k": 0 if self.top_k is None else self.top_k, "seed": self.seed}

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: Union[str, list[TextPart], None] = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    # extension (as in vLLM): arguments for the chat template, e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict[str, Union[bool, int, float, str, None]] | None = Field(default=None, max_length=16)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool | None = False
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        return super().unsupported()


@dataclass
class Usage:
    """What one finished request cost and how well its drafts did."""

    prompt_tokens: int
    completion_tokens: int
    accepted: list[int]  # accepted drafts per cycle
    drafted: list[int]  # drafts verified per cycle (0 for a plain AR step)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def speculative_decoding(self) -> dict:
        return {"drafts": sum(d > 0 for d in self.drafted), "draft_tokens": sum(self.drafted),
                "accepted_tokens": sum(self.accepted),
                "mean_acceptance_length": round(acceptance_length(self.accepted), 4)}


class ResponseBuilder:
    """Builds the OpenAI-shaped bodies of one response, chat or text completion."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _body(self, object: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str, finish_reason: str | None, delta: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        message = {"role": "assistant", "content": text} if not delta or first else ({"content": text} if text else {})
        return {"index": 0, ("delta" if delta else "message"): message, "finish_reason": finish_reason, "logprobs": None}

    def complete(self, text: str, finish_reason: str, usage: Usage) -> dict:
        body = self._body("chat.completion" if self.chat else "text_completion", [self._choice(text, finish_reason, False)])
        return {**body, "usage": usage.usage(), "speculative_decoding": usage.speculative_decoding()}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        return self._body("chat.completion.chunk" if self.chat else "text_completion",
                          [self._choice(text, finish_reason, True, first)])

    def final_chunk(self, finish_reason: str, usage: Usage) -> dict:
        return {**self.chunk("", finish_reason), "speculative_decoding": usage.speculative_decoding()}

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._body("chat.completion.chunk" if self.chat else "text_completion", []), "usage": usage.usage(),
                "speculative_decoding": usage.speculative_decoding()}
