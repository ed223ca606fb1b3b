"""WhatsApp Cloud API webhook payloads, as Meta sends them and as n8n's WhatsApp Trigger
passes them on (the trigger emits one `value` object per item).

Only what the product uses is modelled; everything else is ignored, so new fields Meta
adds do not break intake. Every modelled string must be valid Unicode, and the timestamp
plain digits, so a whole notification is refused (422) before any of it is stored.
Reference: Meta's "Webhooks payload examples" for WhatsApp.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

from common.messages import UnixSeconds, Utf8Str

TIMESTAMP_MAX_DIGITS = 12


def _seconds_from_digits(value: object) -> object:
    """Meta sends Unix seconds as a digit string. `str.isdigit()` alone also accepts '²'
    or '①', and int() refuses over 4300 digits: insist on a few ASCII digits instead."""
    if not isinstance(value, str):
        return value  # a number (n8n may convert it): pydantic checks it is a whole one
    if not (value.isascii() and value.isdigit() and len(value) <= TIMESTAMP_MAX_DIGITS):
        raise ValueError(f"must be Unix seconds: 1 to {TIMESTAMP_MAX_DIGITS} ASCII digits")
    return int(value)


# Strict: after the digits are converted, only a JSON integer is a timestamp (not true, 1.0).
Timestamp = Annotated[UnixSeconds, Strict(), BeforeValidator(_seconds_from_digits)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Profile(_Lenient):
    name: Utf8Str | None = None


class Contact(_Lenient):
    wa_id: Utf8Str | None = None
    profile: Profile = Field(default_factory=Profile)


class Metadata(_Lenient):
    display_phone_number: Utf8Str | None = None
    phone_number_id: Utf8Str | None = None


class TextBody(_Lenient):
    body: Utf8Str


class Reply(_Lenient):
    id: Utf8Str | None = None
    title: Utf8Str


class Interactive(_Lenient):
    type: Utf8Str
    button_reply: Reply | None = None
    list_reply: Reply | None = None


class QuickReplyButton(_Lenient):
    text: Utf8Str
    payload: Utf8Str | None = None


class Message(_Lenient):
    id: Utf8Str
    sender: Utf8Str = Field(alias="from")
    timestamp: Timestamp | None = None
    type: Utf8Str
    text: TextBody | None = None
    interactive: Interactive | None = None
    button: QuickReplyButton | None = None

    def user_text(self) -> str | None:
        """What the user said in words: typed text, or the title of a tapped reply."""
        if self.type == "text" and self.text is not None:
            return self.text.body
        if self.type == "interactive" and self.interactive is not None:
            chosen = self.interactive.button_reply or self.interactive.list_reply
            return chosen.title if chosen else None
        if self.type == "button" and self.button is not None:
            return self.button.text
        return None


class Value(_Lenient):
    """One `changes[].value`: what n8n's WhatsApp Trigger emits as an item."""

    messaging_product: Literal["whatsapp"]
    metadata: Metadata = Field(default_factory=Metadata)
    contacts: list[Contact] = Field(default_factory=list)
    messages: list[Message] = Field(default_factory=list)
    statuses: list[dict[str, Any]] = Field(default_factory=list)

    def name_of(self, wa_id: str) -> str | None:
        for contact in self.contacts:
            if contact.wa_id == wa_id:
                return contact.profile.name
        return self.contacts[0].profile.name if len(self.contacts) == 1 else None


class Change(_Lenient):
    field: Utf8Str | None = None
    value: Value


class Entry(_Lenient):
    id: Utf8Str | None = None
    changes: list[Change] = Field(default_factory=list)


class Notification(_Lenient):
    """The whole body Meta POSTs to a webhook."""

    object: Literal["whatsapp_business_account"]
    entry: list[Entry]

    def values(self) -> list[Value]:
        return [change.value for entry in self.entry for change in entry.changes]


def is_whatsapp_payload(body: dict[str, Any]) -> bool:
    """A raw Cloud API notification or a single `value` item from n8n's trigger.

    A `value` item never has a top-level `message_id`: a body with one is the simple form,
    even when a workflow copied `messaging_product` into it (read as a `value` item with no
    messages, it was answered "ignored" and dropped).
    """
    return body.get("object") == "whatsapp_business_account" or (
        body.get("messaging_product") == "whatsapp" and "message_id" not in body
    )


def whatsapp_values(body: dict[str, Any]) -> list[Value]:
    """The `value` objects in either form; raises pydantic.ValidationError if malformed."""
    if body.get("object") == "whatsapp_business_account":
        return Notification.model_validate(body).values()
    return [Value.model_validate(body)]
