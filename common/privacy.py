"""Phone numbers are personal data: logs get a masked form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def mask_phone(value: str) -> str:
    """`+59112345678` → `+591****5678`; short values keep only their last two characters."""
    if len(value) <= 6:
        return "*" * max(len(value) - 2, 0) + value[-2:]
    return f"{value[:4]}****{value[-4:]}"


def mask_task_args(args: Sequence[object] | None) -> str:
    """The `argsrepr` of a task message: every task takes the session id first, masked."""
    shown = list(args or ())
    if shown and isinstance(shown[0], str):
        shown[0] = mask_phone(shown[0])
    return repr(shown)


def mask_task_kwargs(kwargs: Mapping[str, object] | None) -> str:
    """The `kwargsrepr` of a task message, with a `session_id` keyword masked."""
    shown = dict(kwargs or {})
    if isinstance(shown.get("session_id"), str):
        shown["session_id"] = mask_phone(shown["session_id"])
    return repr(shown)
