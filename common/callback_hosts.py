"""Which callback URLs a payload may name: the defence against SSRF through `callback_url`.

The worker POSTs to whatever URL a message carries, so an attacker who can post messages
could make it call internal services (cloud metadata at 169.254.169.254, Redis, admin
panels). Only origins on CALLBACK_ALLOWED_HOSTS are honoured; by default that is just the
origin of N8N_CALLBACK_URL. Addresses are matched as written: no DNS lookup happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from common.settings import Settings

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class _Origin:
    scheme: str | None  # None: http or https
    host: str
    port: int | None  # None: the scheme's default

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme is not None and self.scheme != scheme:
            return False
        expected_port = self.port or _DEFAULT_PORTS[scheme]
        return self.host == host and expected_port == port


def _parse_entry(entry: str) -> _Origin:
    has_scheme = "://" in entry
    parts = urlsplit(entry if has_scheme else f"//{entry}")
    if not parts.hostname:
        raise ValueError(f"CALLBACK_ALLOWED_HOSTS entry {entry!r} names no host")
    scheme = parts.scheme.lower() if has_scheme else None
    if scheme is not None and scheme not in _DEFAULT_PORTS:
        raise ValueError(f"CALLBACK_ALLOWED_HOSTS entry {entry!r}: only http and https")
    return _Origin(scheme, parts.hostname.lower(), parts.port)


class CallbackHostPolicy:
    """Built once at start-up from the settings; `allows(url)` per message."""

    def __init__(self, settings: Settings) -> None:
        entries = list(settings.callback_allowed_hosts)
        if not entries and settings.n8n_callback_url is not None:
            url = settings.n8n_callback_url
            entries = [f"{url.scheme}://{url.host}:{url.port}"]
        self._origins = tuple(_parse_entry(entry) for entry in entries)

    def allows(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
            port = parts.port or _DEFAULT_PORTS.get(scheme)
        except ValueError:
            return False
        if scheme not in _DEFAULT_PORTS or not host or port is None:
            return False
        return any(origin.matches(scheme, host, port) for origin in self._origins)
