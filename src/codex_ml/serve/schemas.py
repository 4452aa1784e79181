"""Request bodies of the OpenAI-compatible routes (pydantic), as OpenAI documents them.

Unknown fields are refused (as OpenAI does), and so are settings this server cannot honour
(penalties, ``logit_bias``, ``best_of`` other than ``n``): a 400 naming them, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TokenId = Annotated[StrictInt, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: StrictStr
    max_tokens: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[Seed] = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[TokenId], list[list[TokenId]]]
    suffix: Optional[StrictStr] = None
    logprobs: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    echo: StrictBool = False
    best_of: Optional[Annotated[StrictInt, Field(ge=1)]] = None

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self


class ContentPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[ContentPart]]
    name: Optional[StrictStr] = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool = False
    top_logprobs: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    max_completion_tokens: Optional[Annotated[StrictInt, Field(ge=0)]] = None

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


class TokenizeRequest(_Body):
    model: Optional[StrictStr] = None
    prompt: StrictStr


class DetokenizeRequest(_Body):
    model: Optional[StrictStr] = None
    tokens: list[TokenId]


class JobRequest(_Body):
    command: Literal["train", "evaluate"]
    overrides: list[StrictStr] = Field(default_factory=list)
