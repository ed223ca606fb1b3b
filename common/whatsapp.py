"""WhatsApp Cloud API webhook payloads, as Meta sends them and as n8n's WhatsApp Trigger
passes them on (the trigger emits one `value` object per item).

Only what the product uses is modelled; everything else is ignored, so new fields Meta
adds do not break intake. Reference: Meta's "Webhooks payload examples" for WhatsApp.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Profile(_Lenient):
    name: str | None = None


class Contact(_Lenient):
    wa_id: str | None = None
    profile: Profile = Field(default_factory=Profile)


class Metadata(_Lenient):
    display_phone_number: str | None = None
    phone_number_id: str | None = None


class TextBody(_Lenient):
    body: str


class Reply(_Lenient):
    id: str | None = None
    title: str


class Interactive(_Lenient):
    type: str
    button_reply: Reply | None = None
    list_reply: Reply | None = None


class QuickReplyButton(_Lenient):
    text: str
    payload: str | None = None


class Message(_Lenient):
    id: str
    sender: str = Field(alias="from")
    timestamp: str | int | None = None
    type: str
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
    field: str | None = None
    value: Value


class Entry(_Lenient):
    id: str | None = None
    changes: list[Change] = Field(default_factory=list)


class Notification(_Lenient):
    """The whole body Meta POSTs to a webhook."""

    object: Literal["whatsapp_business_account"]
    entry: list[Entry]

    def values(self) -> list[Value]:
        return [change.value for entry in self.entry for change in entry.changes]


def is_whatsapp_payload(body: dict[str, Any]) -> bool:
    """A raw Cloud API notification or a single `value` item from n8n's trigger."""
    return body.get("object") == "whatsapp_business_account" or (
        body.get("messaging_product") == "whatsapp"
    )


def whatsapp_values(body: dict[str, Any]) -> list[Value]:
    """The `value` objects in either form; raises pydantic.ValidationError if malformed."""
    if body.get("object") == "whatsapp_business_account":
        return Notification.model_validate(body).values()
    return [Value.model_validate(body)]
