"""From a request body to the messages it carries, whatever form n8n or Meta used.

Three forms reach `POST /webhook`: the simple JSON an n8n HTTP Request node sends, the raw
WhatsApp Cloud API notification (Meta posting directly), and the single `value` item of
n8n's WhatsApp Trigger. The simple form is one message and any error in it is the
client's (422). A WhatsApp body may carry several messages, status updates, and kinds we
cannot read; those are counted and skipped, so one odd message never makes Meta retry
the whole notification. A body that breaks the WhatsApp models themselves (wrong shape,
text that is not Unicode, a timestamp that is not digits) is refused whole, and since
every message is parsed here before any is stored, a refusal stores nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from common.messages import InboundMessage, MessageKind
from common.settings import Settings
from common.whatsapp import Message, Value, is_whatsapp_payload, whatsapp_values

log = logging.getLogger(__name__)


@dataclass
class Parsed:
    """What one request carries."""

    messages: list[tuple[InboundMessage, MessageKind]] = field(default_factory=list)
    statuses: int = 0  # sent/delivered/read/failed notifications, acknowledged and ignored
    skipped: int = 0  # messages we do not answer (non-text when ignored, unreadable)
    whatsapp: bool = False


def kind_of(text: str, settings: Settings) -> MessageKind:
    return "reset" if text.strip().casefold() in settings.reset_words else "text"


def parse_simple(body: dict[str, Any], settings: Settings) -> Parsed:
    """The n8n HTTP Request form; raises ValidationError for the route to answer 422."""
    inbound = InboundMessage.model_validate(
        body, context={"max_text_length": settings.max_text_length}
    )
    return Parsed(messages=[(inbound, kind_of(inbound.text, settings))])


def parse_whatsapp(body: dict[str, Any], settings: Settings) -> Parsed:
    """A Cloud API notification or a trigger item; raises ValidationError if malformed."""
    parsed = Parsed(whatsapp=True)
    for value in whatsapp_values(body):
        parsed.statuses += len(value.statuses)
        for message in value.messages:
            converted = _convert(value, message, settings)
            if converted is None:
                parsed.skipped += 1
            else:
                parsed.messages.append(converted)
    return parsed


def parse_body(body: dict[str, Any], settings: Settings) -> Parsed:
    if is_whatsapp_payload(body):
        return parse_whatsapp(body, settings)
    return parse_simple(body, settings)


def _convert(
    value: Value, message: Message, settings: Settings
) -> tuple[InboundMessage, MessageKind] | None:
    text = message.user_text()
    if text is None and settings.non_text_messages == "ignore":
        return None
    kind: MessageKind = "non_text" if text is None else kind_of(text, settings)
    metadata = {key: val for key, val in value.metadata.model_dump().items() if val is not None}
    metadata["message_type"] = message.type
    try:
        inbound = InboundMessage.model_validate(
            {
                "message_id": message.id,
                "from": message.sender,
                "text": text if text is not None else f"[{message.type}]",
                "name": value.name_of(message.sender),
                "timestamp": message.timestamp,
                "metadata": metadata,
            },
            context={"max_text_length": settings.max_text_length},
        )
    except ValidationError as exc:
        log.warning("skipped an unreadable WhatsApp message: %s", exc.errors()[0]["msg"])
        return None
    return inbound, kind
