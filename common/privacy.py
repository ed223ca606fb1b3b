"""Phone numbers are personal data: logs get a masked form."""

from __future__ import annotations


def mask_phone(value: str) -> str:
    """`+59112345678` → `+591****5678`; short values keep only their last two characters."""
    if len(value) <= 6:
        return "*" * max(len(value) - 2, 0) + value[-2:]
    return f"{value[:4]}****{value[-4:]}"
