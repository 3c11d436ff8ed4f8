"""Request and response shapes of the OpenAI API subset the server speaks.

Requests are pydantic models (types are checked by FastAPI; values by SamplingParams and the
engine's capacity check). Responses are plain dicts in the OpenAI schema, plus a
`speculative_decoding` summary per response.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal, Union

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
    """Fields shared by chat and text completions. Unknown fields are ignored (clients send many
    optional ones); known fields that would change the answer and are not implemented are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model
    max_tokens: int | None = None  # None: the rest of the context
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # extension (as in vLLM): 0 = no limit
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Union[bool, int, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """The first field asking for something this server does not do, or None."""
        if self.n != 1:
            return "n"
        for name in ("logprobs", "logit_bias"):
            if getattr(self, name):
                return name
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                return name
        return None

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


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
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
    draft_tokens_per_cycle: int  # block size - 1; 0 in AR mode

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def speculative_decoding(self) -> dict:
        drafts = len(self.accepted) if self.draft_tokens_per_cycle else 0
        return {"drafts": drafts, "draft_tokens": drafts * self.draft_tokens_per_cycle,
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
