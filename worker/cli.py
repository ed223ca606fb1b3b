"""Operator commands: `python -m worker check|send|history|dead-letters …`.

Replay posts a dead letter to its callback URL now (same payload, same idempotency key,
so n8n can still drop it if an earlier attempt did arrive) and removes it once n8n
accepts it; one that fails again stays, with the new error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from common.redis_client import connect
from common.settings import get_settings
from worker import operations
from worker.callback import CallbackClient, CallbackError
from worker.outbox import DeadLetters


def _dead_letters() -> DeadLetters:
    settings = get_settings()
    return DeadLetters(connect(settings), settings.key_prefix)


def list_dead_letters(args: argparse.Namespace) -> int:
    entries = _dead_letters().all()
    for entry in entries:
        row = {
            "idempotency_key": entry.idempotency_key,
            "session_id": entry.session_id,
            "url": entry.url,
            "attempts": entry.attempts,
            "last_error": entry.last_error,
            "failed_at": entry.failed_at,
            "in_reply_to": entry.payload.in_reply_to,
        }
        if args.full:
            row["payload"] = entry.payload.model_dump()
        print(json.dumps(row, ensure_ascii=False))
    print(f"{len(entries)} dead letter(s)", file=sys.stderr)
    return 0


def replay_dead_letters(args: argparse.Namespace) -> int:
    store = _dead_letters()
    entries = store.all() if args.all else [e for k in args.keys if (e := store.get(k))]
    if not entries:
        print("nothing to replay", file=sys.stderr)
        return 1 if args.keys else 0
    client = CallbackClient.from_settings(get_settings())
    failed = 0
    for entry in entries:
        try:
            client.post(entry.url, entry.payload, entry.idempotency_key)
        except CallbackError as exc:
            failed += 1
            store.add(
                entry.model_copy(
                    update={
                        "attempts": entry.attempts + 1,
                        "last_error": str(exc),
                        "failed_at": time.time(),
                    }
                )
            )
            print(f"{entry.idempotency_key} failed again: {exc}")
            continue
        store.remove(entry.idempotency_key)
        print(f"{entry.idempotency_key} delivered")
    return 1 if failed else 0


def purge_dead_letters(args: argparse.Namespace) -> int:
    store = _dead_letters()
    removed = store.purge() if args.all else store.remove(*args.keys)
    print(f"purged {removed} dead letter(s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    operations.add_commands(commands)
    dead = commands.add_parser("dead-letters", help="replies that could not be delivered")
    actions = dead.add_subparsers(dest="action", required=True)

    listing = actions.add_parser("list", help="one JSON line per dead letter, oldest first")
    listing.add_argument("--full", action="store_true", help="include the whole payload")
    listing.set_defaults(run=list_dead_letters)

    for name, run, verb in (
        ("replay", replay_dead_letters, "deliver again"),
        ("purge", purge_dead_letters, "delete"),
    ):
        action = actions.add_parser(name, help=f"{verb} dead letters by idempotency key")
        which = action.add_mutually_exclusive_group(required=True)
        which.add_argument("keys", nargs="*", default=[], metavar="KEY")
        which.add_argument("--all", action="store_true")
        action.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)
