"""Payload models: what n8n posts, what waits in the inbox, what history holds, and what
the worker posts back. pydantic does the checking so every rejection names its field."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    StrictStr,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import to_json

# Metadata is stored with every message, kept in history and echoed in the callback:
# shallow enough for any JSON serializer (pydantic's stops at ~255 levels), and small.
METADATA_MAX_DEPTH = 32
METADATA_MAX_BYTES = 16 * 1024
_NOT_UNICODE = "is not valid Unicode text (it contains a lone surrogate)"


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unicode_text(value: object) -> object:
    """JSON may escape a lone surrogate ("\\ud800"): Python decodes it, but it cannot be
    encoded as UTF-8, so storing it would fail after the request was taken. Refuse it."""
    if isinstance(value, str) and not _is_unicode(value):
        raise ValueError(_NOT_UNICODE)
    return value


# A string that can be stored: Redis values and the callback body are UTF-8 JSON.
Utf8Str = Annotated[StrictStr, BeforeValidator(_unicode_text)]

# Identifiers end up inside Redis key names: no whitespace, and no braces, which would
# break the `{session}` hash tag that keeps a conversation in one cluster slot. U+001C to
# U+001F are named because Python's `\s` counts them as whitespace and pydantic's (Rust)
# does not: an id both accept is one `/chat/history` can read back. (The validator goes
# last: a pattern placed after it would vanish from the OpenAPI schema.)
IDENTIFIER_CHAR = r"[^\s\x1c-\x1f{}]"
Identifier = Annotated[
    StrictStr,
    StringConstraints(pattern=rf"^{IDENTIFIER_CHAR}+$", min_length=1),
    BeforeValidator(_unicode_text),
]


def _not_a_bool(value: object) -> object:
    """JSON's true is not the second 1 of 1970, though Python's bool is an int."""
    if isinstance(value, bool):
        raise ValueError("must be a number of seconds, not a boolean")
    return value


UnixSeconds = Annotated[int, Field(ge=0, le=10**11), BeforeValidator(_not_a_bool)]


def _storable_metadata(value: object) -> object:
    """Refuse metadata that could not be stored: too deep, not UTF-8, or too large.

    Runs before pydantic's own checks so a bad key is named plainly, and walks with a
    stack, not recursion, so metadata nested hundreds of levels is refused cheaply.
    A non-object is left to pydantic, which names the expected type.
    """
    if not isinstance(value, dict):
        return value
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > METADATA_MAX_DEPTH:
            raise ValueError(f"is nested deeper than {METADATA_MAX_DEPTH} levels")
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            for text in (key, child):
                if isinstance(text, str) and not _is_unicode(text):
                    raise ValueError(_NOT_UNICODE)
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    if len(to_json(value)) > METADATA_MAX_BYTES:
        raise ValueError(f"is larger than {METADATA_MAX_BYTES} bytes as JSON")
    return value


Metadata = Annotated[
    dict[str, Any],
    BeforeValidator(_storable_metadata),
    Field(
        description="Any JSON object, echoed back untouched in the callback; at most "
        f"{METADATA_MAX_DEPTH} levels deep and {METADATA_MAX_BYTES} bytes as JSON."
    ),
]


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class InboundMessage(BaseModel):
    """The simple JSON form an n8n HTTP Request node posts to `/webhook`."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", str_strip_whitespace=True)

    message_id: Annotated[Identifier, Field(max_length=256)]
    sender: Annotated[Identifier, Field(alias="from", max_length=64)]
    text: Annotated[Utf8Str, Field(min_length=1)]
    session_id: Annotated[Identifier, Field(max_length=128)] | None = None
    name: Annotated[Utf8Str, Field(max_length=256)] | None = None
    timestamp: UnixSeconds | None = None
    callback_url: HttpUrl | None = None
    metadata: Metadata = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text_within_limit(cls, value: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_text_length")
        if limit is not None and len(value) > limit:
            raise ValueError(f"text is longer than {limit} characters")
        return value

    @property
    def conversation_key(self) -> str:
        """`session_id` when given, else the sender: n8n's "Session Key" convention."""
        return self.session_id or self.sender


MessageKind = Literal["text", "non_text", "reset"]


class PendingMessage(BaseModel):
    """An accepted message waiting in a session inbox for a worker.

    `kind` tells the worker how to answer: generate (text), send the polite fixed reply
    (non_text: an image, audio, sticker…), or forget the conversation (reset).
    """

    message_id: str
    kind: MessageKind = "text"
    session_id: str
    sender: str
    text: str
    name: str | None = None
    timestamp: int | None = None
    callback_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    received_at: float = Field(default_factory=time.time)

    @classmethod
    def from_inbound(cls, inbound: InboundMessage, kind: MessageKind = "text") -> PendingMessage:
        return cls(
            message_id=inbound.message_id,
            kind=kind,
            session_id=inbound.conversation_key,
            sender=inbound.sender,
            text=inbound.text,
            name=inbound.name,
            timestamp=inbound.timestamp,
            callback_url=str(inbound.callback_url) if inbound.callback_url else None,
            metadata=inbound.metadata,
        )


class StoredMessage(BaseModel):
    """One entry of a conversation's history (the seeds' shape)."""

    message_id: str
    role: Literal["user", "assistant"]
    content: str
    timestamp: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Conversation(BaseModel):
    """What `GET /chat/history/<session>` returns."""

    conversation_id: str
    user_id: str
    status: Literal["active"] = "active"
    created_at: str
    updated_at: str
    messages: list[StoredMessage]
    metadata: dict[str, Any] = Field(default_factory=dict)


class CallbackPayload(BaseModel):
    """The JSON the worker POSTs to n8n with a reply."""

    to: str
    session_id: str
    reply: str
    in_reply_to: list[str]
    conversation_id: str
    metadata: dict[str, Any]
    model: str
    generated_at: str
    latency_ms: int


class OutboxEntry(BaseModel):
    """A reply on its way to n8n: stored with the turn, removed once delivered."""

    session_id: str
    idempotency_key: str
    url: str
    payload: CallbackPayload
    created_at: float
    next_attempt_at: float
    attempts: int = 0
    last_error: str | None = None
    failed_at: float | None = None  # set when it became a dead letter
