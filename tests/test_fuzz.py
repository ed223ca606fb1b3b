"""Property-based fuzzing of the webhook: the real app (Flask test client) on the real Redis.

Three properties, a few thousand generated requests in all (each test checks its count):

1. Bodies generated from the app's own `/openapi.json` (`InboundMessage`): never a 5xx,
   only 202/200/422/429; a 202 adds exactly one entry to that session's inbox and one
   task to the broker queue, and never lets a callback_url off the allow-list through;
   anything else stores and enqueues nothing.
2. Arbitrary requests (method, path, content type, credentials; any JSON, WhatsApp-shaped
   JSON, near-valid messages, raw bytes): never a 5xx, every 4xx is JSON with an `error`
   key, and nothing is stored by a non-2xx.
3. Credentials: only the right webhook token (bearer or `X-Webhook-Token`) or a correct
   Meta signature gets in; everything else is a 401 that stores nothing.

Inputs this fuzzing once found crashing the app (deep nesting, lone surrogates, odd
WhatsApp timestamps, a bad message late in a notification) are part of the broad
properties again, and each is also pinned by a regression test at the end that checks
its exact 4xx answer and that nothing was stored.

Every example starts from an empty prefix and queue, so examples are independent and a
shrunk counter-example replays on its own. Runs are derandomized for reproducible CI.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import string
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_from_bytes, urlsplit

import pytest
import redis
from flask.testing import FlaskClient
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from common.keys import session_keys
from common.messages import METADATA_MAX_DEPTH, PendingMessage
from common.queue import REPLY_TASK
from common.settings import Settings
from webhook.auth import meta_signature

WEBHOOK_TOKEN = "fuzz-token"
ADMIN_TOKEN = "fuzz-admin"
APP_SECRET = "fuzz-app-secret"
CALLBACK = "https://n8n.example.com/webhook/reply"
ALLOWED_ORIGIN = ("https", "n8n.example.com", 443)
BEARER = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
GOOD = {"message_id": "wamid.fuzz", "from": "+59112345678", "text": "Hola", "name": "Ana"}
FIELDS = [*GOOD, "session_id", "timestamp", "callback_url", "metadata"]

# Requests sent per test, checked at the end of each test so a run that silently
# generated nothing cannot pass.
SENT: Counter[str] = Counter()
MIN_REQUESTS = {"schema": 1500, "arbitrary": 1400, "auth": 700}

FUZZ = hsettings(
    deadline=None,
    derandomize=True,
    database=None,  # derandomized: nothing to replay, so no example database
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The regression tests aim at one input family each: a few examples are enough.
REGRESSION = hsettings(FUZZ, max_examples=25, phases=[Phase.explicit, Phase.generate])

# Deep enough for the JSON parser's recursion limit (~1000 levels), and for objects
# (6 bytes a level) still under the default MAX_BODY_BYTES, so the parser is reached.
MAX_DEPTH = 10_000


class StoredOnRejection(Exception):
    """A refused request changed Redis (its own type, so a report names the leak)."""


# --------------------------------------------------------------------------------------
# The app, Redis and what they log
# --------------------------------------------------------------------------------------


class _ErrorLog(logging.Handler):
    """Keeps the app's error records (with tracebacks) to quote in a 5xx failure."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Harness:
    """One app for a whole test function; `reset()` empties its Redis state per example."""

    def __init__(self, settings: Settings, errors: _ErrorLog) -> None:
        from webhook import create_app

        self.settings = settings
        self.client: FlaskClient = create_app(settings).test_client()
        self.raw = redis.Redis.from_url(settings.redis_url)  # bytes in, bytes out (DUMP)
        self.errors = errors

    def close(self) -> None:
        self.reset()
        self.raw.close()

    def _keys(self) -> list[bytes]:
        return sorted(self.raw.scan_iter(match=f"{self.settings.key_prefix}:*", count=1000))

    def reset(self) -> None:
        keys = self._keys()
        self.raw.delete(self.settings.task_queue, *keys)

    def snapshot(self) -> tuple[dict[bytes, bytes | None], int]:
        """Every key under the prefix with its serialized value, and the queue length."""
        keys = self._keys()
        pipe = self.raw.pipeline(transaction=False)
        for key in keys:
            pipe.dump(key)
        pipe.llen(self.settings.task_queue)
        *values, queued = pipe.execute()
        return dict(zip(keys, values, strict=True)), queued

    def inbox_len(self, session: str) -> int:
        return self.raw.llen(session_keys(self.settings.key_prefix, session).inbox)

    def request(self, kind: str, method: str, path: str, **kwargs: Any):
        SENT[kind] += 1
        self.errors.lines.clear()
        return self.client.open(path, method=method, **kwargs)

    def describe(self, response, sent: object) -> str:
        log = "\n".join(self.errors.lines) or "(nothing logged)"
        body = response.get_data()[:500]
        return f"status {response.status_code}, body {body!r}\nsent: {sent!r}\nlog:\n{log}"


@pytest.fixture(scope="module", autouse=True)
def _report_requests(request: pytest.FixtureRequest) -> Iterator[None]:
    """One line in the pytest output: how many requests each property sent."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None or not SENT:
        return
    counts = ", ".join(f"{kind}={n}" for kind, n in sorted(SENT.items()))
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\nfuzz requests sent: {sum(SENT.values())} ({counts})")


@pytest.fixture
def harness(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> Iterator[Callable[..., Harness]]:
    """Builds the app with the fuzz credentials (and overrides); cleans up afterwards."""
    root = logging.getLogger()
    level = root.level
    errors = _ErrorLog()
    logging.getLogger("webhook").addHandler(errors)
    built: list[Harness] = []

    def build(**overrides: object) -> Harness:
        values: dict[str, object] = {
            "webhook_token": WEBHOOK_TOKEN,
            "admin_token": ADMIN_TOKEN,
            "rate_limit_per_minute": 0,
            "n8n_callback_url": CALLBACK,
            "log_level": "WARNING",  # no access line per request: thousands of them
        }
        values.update(overrides)
        built.append(Harness(make_settings(**values), errors))
        return built[-1]

    yield build
    for item in built:
        item.close()
    logging.getLogger("webhook").removeHandler(errors)
    root.setLevel(level)


def check_common(h: Harness, response, sent: object) -> None:
    """No 5xx, and every 4xx is JSON with `error` and `message` (n8n reads those).

    Answers below 400 are not all JSON: `/metrics` is Prometheus text, the Meta handshake
    echoes its challenge as text, and werkzeug redirects doubled slashes with HTML.
    """
    assert response.status_code < 500, h.describe(response, sent)
    if response.status_code >= 400:
        payload = response.get_json(silent=True)
        assert isinstance(payload, dict), h.describe(response, sent)
        assert isinstance(payload.get("error"), str), h.describe(response, sent)
        assert isinstance(payload.get("message"), str), h.describe(response, sent)


def check_unchanged(h: Harness, before, after, response, sent: object) -> None:
    if before != after:
        keys_before, queued_before = before
        keys_after, queued_after = after
        changed = sorted(
            k
            for k in keys_before.keys() | keys_after.keys()
            if keys_before.get(k) != keys_after.get(k)
        )
        raise StoredOnRejection(
            f"a {response.status_code} changed Redis: keys {changed!r}, "
            f"queue {queued_before} -> {queued_after}\n{h.describe(response, sent)}"
        )


def last_task_args(h: Harness) -> list[Any]:
    """Arguments of the newest Celery message on the queue (kombu LPUSHes)."""
    raw = h.raw.lindex(h.settings.task_queue, 0)
    message = json.loads(raw)
    assert message["headers"]["task"] == REPLY_TASK
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

surrogates = st.characters(categories=["Cs"])
# Printable latin-1: what an HTTP header value can carry.
header_chars = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")


def json_values(
    *, surrogate_text: bool = False, nan: bool = False, max_leaves: int = 6
) -> st.SearchStrategy[Any]:
    """Any JSON value; optionally with lone surrogates and NaN/Infinity (which json.dumps
    writes as `\\udXXX` escapes and bare NaN/Infinity, both of which Python's parser takes)."""
    # st.characters() alone may draw lone surrogates; the utf-8 codec rules them out.
    plain = st.characters(codec="utf-8")
    chars = plain | surrogates if surrogate_text else plain
    text = st.text(chars, max_size=24)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=nan, allow_infinity=nan)
        | text
    )
    return st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4),
        max_leaves=max_leaves,
    )


def nested(depth: int, kind: str, leaf: str = "1") -> str:
    if kind == "array":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


def deep_metadata_body(depth: int, kind: str) -> str:
    return json.dumps({**GOOD, "metadata": {"x": "@"}}).replace('"@"', nested(depth, kind))


def whatsapp_body(timestamp: object = "1700000000", phone_number_id: str = "1098") -> str:
    """A Cloud API notification carrying one text message."""
    message = {
        "id": "wamid.WA1",
        "from": "59170000000",
        "timestamp": timestamp,
        "type": "text",
        "text": {"body": "Hola"},
    }
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": phone_number_id},
        "contacts": [{"wa_id": "59170000000", "profile": {"name": "Ana"}}],
        "messages": [message],
    }
    return json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
        }
    )


def surrogate_metadata_body(char: str, where: str) -> str:
    if where == "whatsapp_phone_number_id":  # copied into the message's metadata
        return whatsapp_body(phone_number_id=char)
    metadata = {
        "value": {"a": char},
        "nested_value": {"a": [{"b": f"x{char}"}]},
        "nested_key": {"a": {char: None}},
    }[where]
    return json.dumps({**GOOD, "metadata": metadata})


def inline_refs(node: Any, components: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """The schema with every `#/components/schemas/X` reference replaced by X itself."""
    if isinstance(node, list):
        return [inline_refs(item, components, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.removeprefix("#/components/schemas/")
        assert name != ref and name in components, f"unresolvable $ref {ref!r}"
        assert name not in seen, f"recursive schema through {name!r}: cannot inline"
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return inline_refs({**copy.deepcopy(components[name]), **rest}, components, (*seen, name))
    return {key: inline_refs(value, components, seen) for key, value in node.items()}


def from_object_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """hypothesis_jsonschema.from_schema, except that objects are assembled here.

    hypothesis-jsonschema 0.23.1 (the newest) draws objects through a private Hypothesis
    API (`many.more()`) that current Hypothesis releases no longer have, so any object
    schema fails with AttributeError. Scalars, strings with patterns and formats, and
    anyOf of those still work, so those stay with from_schema; objects (required and
    optional properties, and extra keys when additionalProperties allows them) are built
    from its per-property strategies.
    """
    for combinator in ("anyOf", "oneOf"):
        branches = schema.get(combinator)
        if branches and any(b.get("type") == "object" for b in branches):
            return st.one_of([from_object_schema(b) for b in branches])
    if schema.get("type") != "object":
        return from_schema(schema)
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    mandatory = {k: from_object_schema(v) for k, v in properties.items() if k in required}
    optional = {k: from_object_schema(v) for k, v in properties.items() if k not in required}
    base = st.fixed_dictionaries(mandatory, optional=optional)
    additional = schema.get("additionalProperties", True)
    if additional is False:
        return base
    values = json_values(max_leaves=4) if additional is True else from_object_schema(additional)
    extra_names = st.text(max_size=12).filter(lambda name: name not in properties)
    extras = st.dictionaries(extra_names, values, max_size=3)
    return st.builds(lambda body, more: {**more, **body}, base, extras)


# Callback URLs the schema allows (format uri) aimed at the allow-list from every side:
# the one allowed origin, and look-alikes that must be refused.
callback_probes = st.sampled_from(
    [
        CALLBACK,
        "https://n8n.example.com/other",
        "https://N8N.Example.COM:443/webhook/reply",
        "http://n8n.example.com/webhook/reply",
        "https://n8n.example.com:8443/webhook/reply",
        "https://n8n.example.com.evil.io/",
        "https://n8n.example.com@evil.io/",
        "https://evil.io/?n8n.example.com",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/",
        "https://localhost:6379/",
        "ftp://n8n.example.com/",
    ]
)


def inbound_from_openapi(document: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    components = document["components"]["schemas"]
    schema = inline_refs(components["InboundMessage"], components)
    assert {"message_id", "from", "text"} <= set(schema["required"])
    strategy = from_object_schema(schema)
    # Some bodies carry a probe of the callback allow-list (still schema-valid URIs).
    probed = st.builds(lambda body, url: {**body, "callback_url": url}, strategy, callback_probes)
    return st.one_of(strategy, strategy, probed)


# --------------------------------------------------------------------------------------
# Property 1: bodies generated from the published schema
# --------------------------------------------------------------------------------------


def test_schema_generated_messages(harness) -> None:
    h = harness()
    document = h.client.get("/openapi.json").get_json()
    bodies = inbound_from_openapi(document)
    statuses: Counter[int] = Counter()

    @hsettings(FUZZ, max_examples=1000)
    @given(st.lists(bodies, min_size=1, max_size=3))
    def run(batch: list[dict[str, Any]]) -> None:
        h.reset()
        for body in batch:
            session = body.get("session_id") or body["from"]
            inbox = session_keys(h.settings.key_prefix, session).inbox.encode()
            seen = session_keys(h.settings.key_prefix, session).seen(body["message_id"]).encode()
            before, inbox_before = h.snapshot(), h.inbox_len(session)
            response = h.request("schema", "POST", "/webhook", json=body, headers=BEARER)
            after = h.snapshot()
            statuses[response.status_code] += 1
            check_common(h, response, body)
            assert response.status_code in (200, 202, 422, 429), h.describe(response, body)
            if response.status_code != 202:
                check_unchanged(h, before, after, response, body)
                continue
            pending = h.inbox_len(session)
            assert pending == inbox_before + 1, h.describe(response, body)
            assert after[1] == before[1] + 1, "a 202 must enqueue exactly one task"
            assert last_task_args(h) == [session]
            changed = {k for k in after[0] if before[0].get(k) != after[0][k]}
            assert changed <= {inbox, seen} and set(before[0]) <= set(after[0]), changed
            assert response.get_json() == {
                "status": "queued",
                "message_id": body["message_id"],
                "session_id": session,
                "pending": pending,
            }
            stored = PendingMessage.model_validate_json(h.raw.lindex(inbox, -1))
            assert (stored.message_id, stored.session_id) == (body["message_id"], session)
            if stored.callback_url is not None:  # the SSRF guard let it through: must be ours
                parts = urlsplit(stored.callback_url)
                origin = (parts.scheme, parts.hostname, parts.port or 443)
                assert origin == ALLOWED_ORIGIN, f"callback to {stored.callback_url} accepted"

    run()
    assert SENT["schema"] >= MIN_REQUESTS["schema"], SENT
    # The run exercised acceptance, duplicates and refusals, not just one of them.
    assert statuses[202] > 100 and statuses[200] > 10 and statuses[422] > 100, statuses


# --------------------------------------------------------------------------------------
# Property 2: arbitrary requests
# --------------------------------------------------------------------------------------


path_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
paths = st.one_of(
    st.sampled_from(
        [
            "/webhook",
            "/webhook/",
            "/webhook?x=1",
            "/openapi.json",
            "/health",
            "/ready",
            "/chat/history",
            "/chat/history/",
            "/redis/test",
            "/redis/stats",
            "/redis/clear",
            "/metrics",
            "/",
            "",
        ]
    ),
    path_text.map(lambda text: "/chat/history/" + quote(text, safe="")),
    path_text.map(lambda text: "/chat/history/" + quote(text, safe="/:@+")),
    st.binary(max_size=30).map(lambda raw: "/chat/history/" + quote_from_bytes(raw, safe="")),
    path_text.map(lambda text: "/" + quote(text, safe="/?=&")),
    st.text(string.ascii_letters + string.digits + "/._-~%", max_size=30).map(lambda t: "/" + t),
)

content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "Application/JSON",
            "application/vnd.api+json",
            "application/json-patch+json",
            "text/json",
            "text/plain",
            "text/html; charset=utf-8",
            "multipart/form-data",
            "multipart/form-data; boundary=----fuzz",
            'multipart/mixed; boundary="a b"',
            "application/x-www-form-urlencoded",
            "application/octet-stream",
            "application/",
            "/json",
            ";;;",
        ]
    ),
    st.text(header_chars, max_size=40),
)

auth_headers = st.one_of(
    st.just({}),
    st.just(BEARER),
    st.just({"X-Webhook-Token": WEBHOOK_TOKEN}),
    st.just({"Authorization": f"Bearer {ADMIN_TOKEN}"}),
    st.just({"X-Admin-Token": ADMIN_TOKEN}),
    st.builds(lambda v: {"Authorization": v}, st.text(header_chars, max_size=30)),
)


def encode_json(value: Any, ensure_ascii: bool, encoding: str) -> bytes:
    text = json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)
    return text.encode(encoding, "surrogatepass")


def near_valid_message() -> st.SearchStrategy[dict[str, Any]]:
    """A good message with fields dropped, replaced by any JSON, or added."""
    any_value = json_values(surrogate_text=True, nan=True)

    def mutate(drop: list[str], replace: dict[str, Any], metadata: Any) -> dict[str, Any]:
        body = {k: v for k, v in GOOD.items() if k not in drop}
        body.update(replace)
        if metadata is not None:
            body["metadata"] = metadata
        return body

    return st.builds(
        mutate,
        st.lists(st.sampled_from(list(GOOD)), max_size=2),
        st.dictionaries(
            st.sampled_from([f for f in FIELDS if f != "metadata"]) | st.text(max_size=8),
            any_value,
            max_size=3,
        ),
        st.none() | any_value | st.dictionaries(st.text(max_size=8), any_value),
    )


def nesting() -> st.SearchStrategy[bytes]:
    """Nested bodies and metadata, around the metadata depth limit and far past it."""
    depth = st.integers(1, 40) | st.integers(1, MAX_DEPTH)
    kinds = st.sampled_from(["array", "object"])
    top = st.builds(nested, depth, kinds).map(str.encode)
    inside = st.builds(deep_metadata_body, depth, kinds).map(str.encode)
    return top | inside


# Strings str.isdigit() accepts and int() refuses: other digit characters, or too many.
bad_timestamps = st.one_of(
    st.text(st.sampled_from("\u00b2\u00b3\u00b9\u2070\u2074\u2460\u2468"), min_size=1, max_size=6),
    st.integers(4_301, 6_000).map(lambda n: "9" * n),
)


def with_surrogate(max_size: int) -> st.SearchStrategy[str]:
    """Text, a quarter of the time with a lone surrogate somewhere inside."""
    plain = st.text(max_size=max_size)
    spoiled = st.builds(lambda a, c, b: a + c + b, plain, surrogates, plain)
    return st.one_of(plain, plain, plain, spoiled)


def whatsapp_bodies(timestamps: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Cloud API notifications and n8n WhatsApp Trigger items: right shape, odd content."""
    ids = st.sampled_from(["wamid.A1", "wamid.B2", "+59112345678", "59170000000"]) | st.text(
        max_size=12
    )
    reply = st.fixed_dictionaries({"title": st.text(max_size=20)}, optional={"id": ids})
    message = st.fixed_dictionaries(
        {
            "id": ids,
            "from": ids,
            "type": st.sampled_from(["text", "interactive", "button", "image", "sticker"])
            | st.text(max_size=8),
        },
        optional={
            "timestamp": timestamps,
            "text": st.fixed_dictionaries({"body": with_surrogate(60)}) | json_values(),
            "interactive": st.fixed_dictionaries(
                {"type": st.sampled_from(["button_reply", "list_reply"])},
                optional={"button_reply": reply, "list_reply": reply},
            ),
            "button": st.fixed_dictionaries({"text": st.text(max_size=20)}),
        },
    )
    contact = st.fixed_dictionaries(
        {"wa_id": ids}, optional={"profile": st.fixed_dictionaries({"name": with_surrogate(16)})}
    )
    metadata = st.fixed_dictionaries(
        {}, optional={"phone_number_id": with_surrogate(16), "display_phone_number": ids}
    )
    value = st.fixed_dictionaries(
        {"messaging_product": st.just("whatsapp")},
        optional={
            "metadata": metadata,
            "contacts": st.lists(contact, max_size=2),
            "messages": st.lists(message, max_size=3),
            "statuses": st.lists(json_values(max_leaves=3), max_size=2),
        },
    )
    change = st.fixed_dictionaries({"value": value}, optional={"field": st.just("messages")})
    entry = st.fixed_dictionaries(
        {"changes": st.lists(change, max_size=2)}, optional={"id": st.text(max_size=6)}
    )
    notification = st.fixed_dictionaries(
        {"object": st.just("whatsapp_business_account"), "entry": st.lists(entry, max_size=2)}
    )
    return notification | value


any_timestamps = (
    st.none()
    | st.integers(-1, 10**12)
    | st.integers(0, 10**12).map(str)
    | st.text(max_size=12)
    | bad_timestamps
)

bodies = st.one_of(
    st.builds(
        encode_json,
        json_values(surrogate_text=True, nan=True),
        st.booleans(),
        st.sampled_from(["utf-8", "utf-16", "utf-32"]),
    ),
    st.builds(encode_json, near_valid_message(), st.booleans(), st.sampled_from(["utf-8"])),
    st.builds(encode_json, near_valid_message(), st.just(True), st.sampled_from(["utf-8"])),
    st.builds(encode_json, whatsapp_bodies(any_timestamps), st.booleans(), st.just("utf-8")),
    st.binary(max_size=200),
    st.text(max_size=80).map(str.encode),
    nesting(),
    st.sampled_from([b"", b"null", b"{}", b"[]", b"0", b'"x"', b"{", b"\xef\xbb\xbf{}", b"NaN"]),
    st.integers(60_000, 70_000).map(lambda n: b'{"text":"' + b"x" * n + b'"}'),
    st.integers(4_000, 5_000).map(lambda n: b'{"metadata":{"n":' + b"9" * n + b"}}"),
)

methods = st.sampled_from(["POST", "PUT", "GET", "DELETE", "PATCH"])
json_types = st.sampled_from(["application/json", "application/json; charset=utf-8"])
# Two thirds of the requests go where the data is: POST /webhook, mostly with the token and
# a JSON content type; the rest anywhere, any way.
requests = st.one_of(
    st.fixed_dictionaries(
        {
            "method": st.just("POST"),
            "path": st.sampled_from(["/webhook", "/webhook?hub.mode=subscribe"]),
            "content_type": json_types | content_types,
            "headers": st.just(BEARER) | auth_headers,
            "body": bodies,
        }
    ),
    st.fixed_dictionaries(
        {
            "method": st.just("POST"),
            "path": st.just("/webhook"),
            "content_type": json_types,
            "headers": st.just(BEARER),
            "body": bodies,
        }
    ),
    st.fixed_dictionaries(
        {
            "method": methods,
            "path": paths,
            "content_type": content_types,
            "headers": auth_headers,
            "body": bodies,
        }
    ),
)


def test_arbitrary_requests(harness) -> None:
    h = harness()
    statuses: Counter[int] = Counter()

    @hsettings(FUZZ, max_examples=1500)
    @given(requests)
    def run(req: dict[str, Any]) -> None:
        h.reset()
        sent = {**req, "body": req["body"][:300]}
        before = h.snapshot()
        kwargs: dict[str, Any] = {"data": req["body"], "headers": req["headers"]}
        if req["content_type"] is not None:
            kwargs["content_type"] = req["content_type"]
        response = h.request("arbitrary", req["method"], req["path"], **kwargs)
        after = h.snapshot()
        statuses[response.status_code] += 1
        check_common(h, response, sent)
        if not 200 <= response.status_code < 300:
            check_unchanged(h, before, after, response, sent)

    run()
    assert SENT["arbitrary"] >= MIN_REQUESTS["arbitrary"], SENT
    # Reached the interesting answers, not just 404s.
    assert all(statuses[code] > 5 for code in (200, 202, 400, 401, 404, 405, 415, 422)), statuses


# --------------------------------------------------------------------------------------
# Property 3: credentials
# --------------------------------------------------------------------------------------

wrong_tokens = st.one_of(
    st.sampled_from(
        [
            "",
            ADMIN_TOKEN,
            APP_SECRET,
            WEBHOOK_TOKEN.upper(),
            WEBHOOK_TOKEN[:-1],
            WEBHOOK_TOKEN + "x",
            "x" + WEBHOOK_TOKEN,
            f"{WEBHOOK_TOKEN[:4]} {WEBHOOK_TOKEN[4:]}",
            f"Bearer {WEBHOOK_TOKEN}",
            f"{WEBHOOK_TOKEN},{WEBHOOK_TOKEN}",
        ]
    ),
    st.text(header_chars, max_size=24),
).filter(lambda token: token.strip() != WEBHOOK_TOKEN)

padding = st.sampled_from(["", " ", "  ", "\t", " \t "])


@st.composite
def token_value(draw: st.DrawFn) -> tuple[str, bool]:
    """(token, is it the right one): the right token may come padded, the app strips it."""
    if draw(st.booleans()):
        return draw(padding) + WEBHOOK_TOKEN + draw(padding), True
    return draw(wrong_tokens), False


@st.composite
def authorization(draw: st.DrawFn) -> tuple[str, bool]:
    token, right = draw(token_value())
    scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", "Bearer:", ""]))
    if scheme == "Basic" and draw(st.booleans()):
        token, right = base64.b64encode(f"user:{WEBHOOK_TOKEN}".encode()).decode(), False
    separator = draw(st.sampled_from([" ", "  ", "\t", ""]))
    # RFC 7235: the scheme is case-insensitive and followed by one or more spaces.
    valid = right and scheme.lower() == "bearer" and separator.startswith(" ")
    return f"{scheme}{separator}{token}", valid


@st.composite
def signature(draw: st.DrawFn, body: bytes) -> tuple[str, bool]:
    right = meta_signature(body, APP_SECRET)
    choice = draw(
        st.sampled_from(["right", "upper", "padded", "other_secret", "other_body", "random"])
    )
    if choice == "right":
        return right, True
    if choice == "upper":
        return right.upper(), True  # hex digits compare case-insensitively
    if choice == "padded":
        return f" {right} ", True
    if choice == "other_secret":
        return meta_signature(body, WEBHOOK_TOKEN), False
    if choice == "other_body":
        return meta_signature(body + b" ", APP_SECRET), False
    value = draw(
        st.text(header_chars, max_size=80)
        | st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256=" + h)
    )
    return value, False


def random_case(draw: st.DrawFn, name: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


@st.composite
def credentialed_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str], bool, str]:
    message_id = draw(st.text(string.ascii_letters + string.digits + ".-_", min_size=1))
    body = json.dumps({**GOOD, "message_id": message_id}).encode()
    headers: dict[str, str] = {}
    allowed, how = False, "nothing"
    parts = draw(
        st.sets(st.sampled_from(["authorization", "token", "signature", "admin"]), max_size=4)
    )
    for part in sorted(parts):
        if part == "authorization":
            value, ok = draw(authorization())
            name = "Authorization"
        elif part == "token":
            value, ok = draw(token_value())
            name = "X-Webhook-Token"
        elif part == "signature":
            value, ok = draw(signature(body))
            name = "X-Hub-Signature-256"
        else:
            value, ok = draw(st.sampled_from([ADMIN_TOKEN, WEBHOOK_TOKEN])), False
            name = "X-Admin-Token"  # never a webhook credential
        headers[random_case(draw, name)] = value
        if ok and not allowed:
            allowed, how = True, part
    return body, headers, allowed, how


def test_credentials(harness) -> None:
    h = harness(whatsapp_app_secret=APP_SECRET)
    outcomes: Counter[str] = Counter()

    @hsettings(FUZZ, max_examples=800)
    @given(credentialed_requests())
    @example((json.dumps(GOOD).encode(), BEARER, True, "authorization"))
    @example((json.dumps(GOOD).encode(), {"X-Webhook-Token": WEBHOOK_TOKEN}, True, "token"))
    @example((json.dumps(GOOD).encode(), {}, False, "nothing"))
    def run(case: tuple[bytes, dict[str, str], bool, str]) -> None:
        body, headers, allowed, how = case
        h.reset()
        before = h.snapshot()
        response = h.request(
            "auth", "POST", "/webhook", data=body, headers=headers, content_type="application/json"
        )
        after = h.snapshot()
        check_common(h, response, case)
        if allowed:
            outcomes[how] += 1
            assert response.status_code == 202, h.describe(response, case)
            assert h.inbox_len(GOOD["from"]) == 1 and after[1] == before[1] + 1
        else:
            outcomes["refused"] += 1
            assert response.status_code == 401, h.describe(response, case)
            assert response.get_json()["error"] == "unauthorized"
            assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
            check_unchanged(h, before, after, response, case)

    run()
    assert SENT["auth"] >= MIN_REQUESTS["auth"], SENT
    assert all(outcomes[k] > 10 for k in ("authorization", "token", "signature", "refused"))


# --------------------------------------------------------------------------------------
# Regressions found by this fuzzing: each input family once answered 500 (and the last
# one stored part of a notification first); now each gets its own 4xx and stores nothing.
# --------------------------------------------------------------------------------------


kinds = st.sampled_from(["array", "object"])
deep_bodies = st.builds(nested, st.integers(1_000, MAX_DEPTH), kinds)
# Past the metadata limit, yet shallow enough for the JSON parser under pytest's stack.
deep_metadata = st.builds(deep_metadata_body, st.integers(METADATA_MAX_DEPTH, 500), kinds)
surrogate_metadata = st.builds(
    surrogate_metadata_body,
    surrogates,
    st.sampled_from(["value", "nested_value", "nested_key", "whatsapp_phone_number_id"]),
)
whatsapp_bad_timestamp = st.builds(whatsapp_body, bad_timestamps)


def post_refused(h: Harness, body: str, statuses: tuple[int, ...]) -> dict[str, Any]:
    """POST `body`; the answer must be one of `statuses`, in the app's error shape, and
    Redis must be unchanged. Returns the error body."""
    before = h.snapshot()
    response = h.request(
        "regression",
        "POST",
        "/webhook",
        data=body.encode(),
        headers=BEARER,
        content_type="application/json",
    )
    check_unchanged(h, before, h.snapshot(), response, body[:200])
    check_common(h, response, body[:200])
    assert response.status_code in statuses, h.describe(response, body[:200])
    return response.get_json()


def test_deeply_nested_json_body_is_400(harness) -> None:
    """Was a 500: json's parser raised RecursionError, which get_json(silent=True) lets out."""
    h = harness()

    @REGRESSION
    @given(deep_bodies)
    @example(nested(1_000, "array"))
    def run(body: str) -> None:
        h.reset()
        # 422 only if a runtime's parser goes deeper than ours: parsed, but not a message.
        error = post_refused(h, body, (400, 422))
        if error["error"] == "invalid_json":
            assert "nested too deeply" in error["message"]

    run()


def test_deeply_nested_metadata_is_422(harness) -> None:
    """Was a 500: schema-valid metadata ~255 levels deep broke serialization in accept."""
    h = harness()

    @REGRESSION
    @given(deep_metadata)
    @example(deep_metadata_body(300, "array"))
    def run(body: str) -> None:
        h.reset()
        error = post_refused(h, body, (422,))
        assert error["message"] == f"metadata: is nested deeper than {METADATA_MAX_DEPTH} levels"

    run()


def test_surrogate_in_metadata_is_422(harness) -> None:
    """Was a 500: a lone surrogate in metadata (a value or a key, or WhatsApp's
    phone_number_id) passed validation, then could not be encoded as UTF-8 in accept."""
    h = harness()

    @REGRESSION
    @given(surrogate_metadata)
    @example(surrogate_metadata_body("\ud800", "value"))
    @example(surrogate_metadata_body("\udfff", "whatsapp_phone_number_id"))
    def run(body: str) -> None:
        h.reset()
        error = post_refused(h, body, (422,))
        (problem,) = error["errors"]
        assert problem["field"].endswith(("metadata", "metadata.phone_number_id")), error
        assert "lone surrogate" in problem["message"]

    run()


def test_whatsapp_timestamp_is_422(harness) -> None:
    """Was a 500: str.isdigit() took '²' and 4300+ digit strings, which int() refuses."""
    h = harness()

    @REGRESSION
    @given(whatsapp_bad_timestamp)
    @example(whatsapp_body("\u00b2"))
    @example(whatsapp_body("9" * 4_301))
    def run(body: str) -> None:
        h.reset()
        error = post_refused(h, body, (422,))
        (problem,) = error["errors"]
        assert problem["field"] == "entry.0.changes.0.value.messages.0.timestamp", error
        assert "ASCII digits" in problem["message"]

    run()


def whatsapp_two_values(char: str, bad_first: bool) -> str:
    """One notification, two `changes`: a good message and one with `char` in its metadata."""
    good = json.loads(whatsapp_body())
    bad = json.loads(whatsapp_body(phone_number_id=char))["entry"][0]["changes"][0]
    bad["value"]["messages"][0]["id"] = "wamid.WA2"
    changes = good["entry"][0]["changes"]
    changes.insert(0 if bad_first else 1, bad)
    return json.dumps(good)


def whatsapp_two_messages(timestamp: str, bad_first: bool) -> str:
    """One `value` with two messages: a good one and one whose timestamp is `timestamp`."""
    body = json.loads(whatsapp_body())
    messages = body["entry"][0]["changes"][0]["value"]["messages"]
    bad = {**messages[0], "id": "wamid.WA2", "timestamp": timestamp}
    messages.insert(0 if bad_first else 1, bad)
    return json.dumps(body)


bad_notifications = st.one_of(
    st.builds(whatsapp_two_values, surrogates, st.booleans()),
    st.builds(whatsapp_two_messages, bad_timestamps, st.booleans()),
)


def test_whatsapp_bad_message_mid_notification_stores_nothing(harness) -> None:
    """Was a 500 after the first message was queued: Meta retried for ever, the first
    message a "duplicate", the second never taken. Now the whole notification is 422."""
    h = harness()

    @REGRESSION
    @given(bad_notifications)
    @example(whatsapp_two_values("\ud800", False))
    @example(whatsapp_two_messages("\u00b2", False))
    def run(body: str) -> None:
        h.reset()
        error = post_refused(h, body, (422,))
        assert error["error"] == "invalid_payload"

    run()
