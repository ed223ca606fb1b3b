"""The example n8n workflows in examples/n8n: importable shape, the right wiring, and a
Code node that really verifies the worker's signed callbacks.

The JavaScript parts (the Code node, the HTTP Request body and IF expressions) run under
Node.js when `node` is on PATH; those tests are skipped otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import responses
from standardwebhooks.webhooks import Webhook

from common.messages import CallbackPayload, InboundMessage
from worker.callback import CallbackClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "n8n"
WORKFLOW_FILES = sorted(EXAMPLES.glob("*.json"))
INBOUND = EXAMPLES / "01-whatsapp-to-reply-worker.json"
CALLBACK = EXAMPLES / "02-reply-worker-callback-to-whatsapp.json"

STICKY = "n8n-nodes-base.stickyNote"
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def only_node(workflow: dict[str, Any], node_type: str) -> dict[str, Any]:
    found = [node for node in workflow["nodes"] if node["type"] == node_type]
    assert len(found) == 1, f"expected one {node_type} node, found {len(found)}"
    return found[0]


def targets(workflow: dict[str, Any], source: str, output: int = 0) -> list[str]:
    outputs = workflow["connections"].get(source, {}).get("main", [])
    if output >= len(outputs):
        return []
    return [link["node"] for link in outputs[output]]


def expression_source(value: str) -> str:
    """The JavaScript inside a parameter that is exactly one `={{ … }}` expression."""
    assert value.startswith("={{") and value.endswith("}}"), value
    inner = value[3:-2]
    assert "{{" not in inner and "}}" not in inner, value
    return inner.strip()


def walk_strings(value: Any, path: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk_strings(item, f"{path}[{index}]")
    elif isinstance(value, str):
        yield path, value


# --- every file: an importable n8n workflow ------------------------------------------------


def test_both_example_workflows_exist() -> None:
    assert INBOUND in WORKFLOW_FILES
    assert CALLBACK in WORKFLOW_FILES


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_file_is_an_n8n_workflow(path: Path) -> None:
    workflow = load(path)
    assert isinstance(workflow.get("name"), str) and workflow["name"].strip()
    assert isinstance(workflow.get("nodes"), list) and workflow["nodes"]
    assert isinstance(workflow.get("connections"), dict)

    for node in workflow["nodes"]:
        assert isinstance(node.get("name"), str) and node["name"], node
        assert isinstance(node.get("id"), str) and node["id"], node
        assert isinstance(node.get("type"), str) and node["type"].startswith("n8n-nodes-base.")
        version = node.get("typeVersion")
        assert isinstance(version, int | float) and not isinstance(version, bool), node
        assert version >= 1, node
        position = node.get("position")
        assert isinstance(position, list) and len(position) == 2, node
        assert all(isinstance(xy, int | float) for xy in position), node
        assert isinstance(node.get("parameters"), dict), node

    names = [node["name"] for node in workflow["nodes"]]
    ids = [node["id"] for node in workflow["nodes"]]
    assert len(set(names)) == len(names), "node names must be unique"
    assert len(set(ids)) == len(ids), "node ids must be unique"

    sticky_names = {node["name"] for node in workflow["nodes"] if node["type"] == STICKY}
    for source, kinds in workflow["connections"].items():
        assert source in names, f"connection from unknown node {source!r}"
        assert source not in sticky_names
        assert isinstance(kinds, dict) and kinds
        for kind, outputs in kinds.items():
            assert kind == "main"
            assert isinstance(outputs, list)
            for links in outputs:
                assert isinstance(links, list)
                for link in links:
                    assert link["node"] in names, f"connection to unknown node {link['node']!r}"
                    assert link["node"] not in sticky_names
                    assert link["type"] == "main"
                    assert isinstance(link["index"], int) and link["index"] >= 0


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_expressions_are_marked_as_expressions(path: Path) -> None:
    """n8n treats `{{ … }}` literally unless the value starts with `=`."""
    for node in load(path)["nodes"]:
        if node["type"] in (STICKY, "n8n-nodes-base.code"):
            continue
        for where, value in walk_strings(node["parameters"]):
            if "{{" in value:
                assert value.startswith("="), f"{node['name']}{where}: {value!r}"
                assert value.count("{{") == value.count("}}"), f"{node['name']}{where}"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_ships_inactive_and_without_secrets(path: Path) -> None:
    workflow = load(path)
    assert workflow.get("active") in (None, False)
    text = path.read_text(encoding="utf-8")
    assert SECRET not in text
    assert not re.search(r"whsec_[A-Za-z0-9+/=]{16,}", text), "a callback secret is embedded"


# --- workflow 1: WhatsApp Trigger → IF → HTTP Request to /webhook ------------------------


def test_inbound_workflow_is_wired_trigger_filter_request() -> None:
    workflow = load(INBOUND)
    trigger = only_node(workflow, "n8n-nodes-base.whatsAppTrigger")
    check = only_node(workflow, "n8n-nodes-base.if")
    request = only_node(workflow, "n8n-nodes-base.httpRequest")

    assert "messages" in trigger["parameters"]["updates"]
    assert "whatsAppTriggerApi" in trigger.get("credentials", {})
    assert targets(workflow, trigger["name"]) == [check["name"]]
    assert targets(workflow, check["name"], 0) == [request["name"]]
    assert targets(workflow, check["name"], 1) == []  # receipts and media stop here

    condition = check["parameters"]["conditions"]["conditions"]
    assert len(condition) == 1
    assert "messages" in condition[0]["leftValue"] and "type" in condition[0]["leftValue"]
    assert condition[0]["rightValue"] == "text"
    assert condition[0]["operator"] == {"type": "string", "operation": "equals"}


def test_inbound_request_posts_json_to_the_webhook_with_header_auth() -> None:
    request = only_node(load(INBOUND), "n8n-nodes-base.httpRequest")
    params = request["parameters"]

    assert params["method"] == "POST"
    assert params["url"].rstrip().endswith("/webhook")
    assert params["authentication"] == "genericCredentialType"
    assert params["genericAuthType"] == "httpHeaderAuth"
    assert "httpHeaderAuth" in request.get("credentials", {})
    assert params["sendBody"] is True
    assert params["specifyBody"] == "json"
    body = params["jsonBody"]
    for field in ("message_id", "from", "text", "metadata", "phone_number_id"):
        assert f'"{field}"' in body, field
    assert "$json.metadata.phone_number_id" in body
    assert request.get("retryOnFail") is True
    assert request.get("maxTries", 3) >= 2


# --- workflow 2: Webhook → Code (verify) → WhatsApp send ----------------------------------


def test_callback_workflow_is_wired_webhook_code_whatsapp() -> None:
    workflow = load(CALLBACK)
    webhook = only_node(workflow, "n8n-nodes-base.webhook")
    code = only_node(workflow, "n8n-nodes-base.code")
    send = only_node(workflow, "n8n-nodes-base.whatsApp")

    assert targets(workflow, webhook["name"]) == [code["name"]]
    assert targets(workflow, code["name"]) == [send["name"]]

    assert webhook["parameters"]["httpMethod"] == "POST"
    assert webhook["parameters"]["path"].strip("/")
    assert webhook["parameters"].get("responseMode", "onReceived") == "onReceived"
    assert webhook["parameters"]["options"].get("rawBody") is True
    assert webhook.get("webhookId")


def test_callback_code_node_checks_the_signature() -> None:
    source = only_node(load(CALLBACK), "n8n-nodes-base.code")["parameters"]["jsCode"]
    for piece in (
        "require('crypto')",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "createHmac",
        "sha256",
        "$getWorkflowStaticData",
        "REPLY_WORKER_CALLBACK_SECRET",
    ):
        assert piece in source, piece
    assert "timingSafeEqual" in source


def test_callback_sends_the_reply_text_to_the_sender() -> None:
    send = only_node(load(CALLBACK), "n8n-nodes-base.whatsApp")
    params = send["parameters"]
    assert params["resource"] == "message"
    assert params["operation"] == "send"
    assert params.get("messageType", "text") == "text"
    assert "$json.reply" in params["textBody"]
    assert "$json.to" in params["recipientPhoneNumber"]
    assert "$json.metadata.phone_number_id" in params["phoneNumberId"]
    assert "whatsAppApi" in send.get("credentials", {})


def test_callback_notes_name_what_the_instance_needs() -> None:
    notes = " ".join(
        node["parameters"]["content"] for node in load(CALLBACK)["nodes"] if node["type"] == STICKY
    )
    for needed in (
        "NODE_FUNCTION_ALLOW_BUILTIN=crypto",
        "REPLY_WORKER_CALLBACK_SECRET",
        "CALLBACK_SECRET",
        "WEBHOOK_TOKEN",
        "X-Webhook-Token",
        "N8N_CALLBACK_URL",
    ):
        assert needed in notes, needed


# --- running the JavaScript under Node.js -------------------------------------------------

HARNESS = r"""
const fs = require('fs');
const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
const items = input.items;
const staticData = input.staticData;
const context = {
  helpers: {
    getBinaryDataBuffer: async (index, name) =>
      Buffer.from(items[index].binary[name].data, 'base64'),
  },
};
const $input = { all: () => items, first: () => items[0] };
const $getWorkflowStaticData = (scope) => {
  if (scope !== 'global') throw new Error('unexpected static data scope ' + scope);
  return staticData;
};
const $env = new Proxy(input.env, {
  get(target, name) {
    if (input.blockEnv) throw new Error('access to env vars denied');
    return target[name];
  },
});
const run = new AsyncFunction(
  '$input', '$getWorkflowStaticData', '$vars', '$env', 'require', input.code,
);
run
  .call(context, $input, $getWorkflowStaticData, input.vars, $env, require)
  .then((result) => process.stdout.write(JSON.stringify({ ok: true, result, staticData })))
  .catch((error) =>
    process.stdout.write(JSON.stringify({ ok: false, error: String(error.message || error) })),
  );
"""

EXPRESSION = r"""
const fs = require('fs');
const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const evaluate = new Function('$json', 'return (' + input.source + ');');
process.stdout.write(JSON.stringify(input.items.map((item) => evaluate(item))));
"""


def run_node(tmp_path: Path, script: str, payload: dict[str, Any]) -> Any:
    assert NODE is not None
    path = tmp_path / "harness.js"
    path.write_text(script, encoding="utf-8")
    done = subprocess.run(
        [NODE, str(path)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "NODE_OPTIONS": ""},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def callback_body() -> str:
    payload = CallbackPayload(
        to="59112345678",
        session_id="59112345678",
        reply='¡Hola! ¿En qué puedo ayudarte? 👋 "quotes" and\nnew lines',
        in_reply_to=["wamid.HBgLNTkxMTIzNDU2NzgVAgASGBQ"],
        conversation_id="conv_59112345678_1728123456",
        metadata={"phone_number_id": "123456789012345"},
        model="microsoft/DialoGPT-medium",
        generated_at="2024-10-05T10:17:39+00:00",
        latency_ms=2870,
    )
    return payload.model_dump_json()


def signed_item(
    body: str,
    *,
    msg_id: str = "0123456789abcdef0123456789abcdef",
    at: float | None = None,
    secret: str = SECRET,
    sent_body: str | None = None,
) -> dict[str, Any]:
    """The item n8n's Webhook node (Raw Body on) hands the next node for one callback."""
    moment = datetime.fromtimestamp(int(time.time() if at is None else at), UTC)
    signature = Webhook(secret).sign(msg_id, moment, body)
    raw = (body if sent_body is None else sent_body).encode()
    return {
        "json": {
            "headers": {
                "content-type": "application/json",
                "idempotency-key": msg_id,
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(moment.timestamp())),
                "webhook-signature": signature,
            },
            "params": {},
            "query": {},
            "body": json.loads(raw),
        },
        "binary": {
            "data": {"data": base64.b64encode(raw).decode(), "mimeType": "application/json"}
        },
    }


@pytest.fixture
def verify(tmp_path: Path):
    """Run the Code node of workflow 2 on items, as n8n would."""
    if NODE is None:
        pytest.skip("node (Node.js) is not on PATH")
    code = only_node(load(CALLBACK), "n8n-nodes-base.code")["parameters"]["jsCode"]

    def call(
        items: list[dict[str, Any]],
        *,
        static: dict[str, Any] | None = None,
        variables: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        block_env: bool = False,
    ) -> dict[str, Any]:
        return run_node(
            tmp_path,
            HARNESS,
            {
                "code": code,
                "items": items,
                "staticData": {} if static is None else static,
                "vars": {"REPLY_WORKER_CALLBACK_SECRET": SECRET}
                if variables is None
                else variables,
                "env": env or {},
                "blockEnv": block_env,
            },
        )

    return call


def test_code_node_passes_a_correctly_signed_callback(verify) -> None:
    body = callback_body()
    outcome = verify([signed_item(body, msg_id="key-1")])
    assert outcome["ok"], outcome
    assert outcome["result"] == [{"json": json.loads(body), "pairedItem": {"item": 0}}]
    assert outcome["staticData"]["seenWebhookIds"] == ["key-1"]


def test_code_node_rejects_a_tampered_body(verify) -> None:
    body = callback_body()
    tampered = body.replace("59112345678", "59187654321", 1)
    outcome = verify([signed_item(body, sent_body=tampered)])
    assert not outcome["ok"]
    assert "signature" in outcome["error"]


def test_code_node_rejects_a_wrong_secret(verify) -> None:
    other = "whsec_" + base64.b64encode(b"another secret, 32 bytes long!!!").decode()
    outcome = verify([signed_item(callback_body(), secret=other)])
    assert not outcome["ok"]
    assert "signature" in outcome["error"]


@pytest.mark.parametrize("offset", [-600, 600], ids=["stale", "future"])
def test_code_node_rejects_a_timestamp_over_five_minutes_away(verify, offset: int) -> None:
    outcome = verify([signed_item(callback_body(), at=time.time() + offset)])
    assert not outcome["ok"]
    assert "webhook-timestamp" in outcome["error"]


def test_code_node_accepts_a_timestamp_within_five_minutes(verify) -> None:
    outcome = verify([signed_item(callback_body(), at=time.time() - 240)])
    assert outcome["ok"], outcome


def test_code_node_drops_a_repeated_webhook_id(verify) -> None:
    body = callback_body()
    first = verify([signed_item(body, msg_id="key-1")])
    assert first["ok"] and len(first["result"]) == 1

    again = verify([signed_item(body, msg_id="key-1")], static=first["staticData"])
    assert again["ok"], again
    assert again["result"] == []
    assert again["staticData"]["seenWebhookIds"] == ["key-1"]

    other = verify([signed_item(body, msg_id="key-2")], static=again["staticData"])
    assert len(other["result"]) == 1
    assert other["staticData"]["seenWebhookIds"] == ["key-1", "key-2"]


def test_code_node_drops_a_repeat_within_one_batch(verify) -> None:
    body = callback_body()
    outcome = verify([signed_item(body, msg_id="key-1"), signed_item(body, msg_id="key-1")])
    assert outcome["ok"], outcome
    assert [item["pairedItem"] for item in outcome["result"]] == [{"item": 0}]


def test_code_node_keeps_a_bounded_list_of_ids(verify) -> None:
    remembered = [f"old-{n}" for n in range(5000)]
    outcome = verify(
        [signed_item(callback_body(), msg_id="new")], static={"seenWebhookIds": remembered}
    )
    assert outcome["ok"], outcome
    seen = outcome["staticData"]["seenWebhookIds"]
    assert len(seen) <= 1000
    assert seen[-1] == "new"
    assert "old-0" not in seen


def test_code_node_refuses_a_missing_signature(verify) -> None:
    item = signed_item(callback_body())
    del item["json"]["headers"]["webhook-signature"]
    outcome = verify([item])
    assert not outcome["ok"]
    assert "webhook-signature" in outcome["error"]


def test_code_node_refuses_without_the_raw_body(verify) -> None:
    item = signed_item(callback_body())
    del item["binary"]
    outcome = verify([item])
    assert not outcome["ok"]
    assert "Raw Body" in outcome["error"]


def test_code_node_accepts_any_matching_signature_of_several(verify) -> None:
    item = signed_item(callback_body())
    headers = item["json"]["headers"]
    bogus = "v1," + base64.b64encode(b"x" * 32).decode()
    headers["webhook-signature"] = f"v2,abc {bogus} {headers['webhook-signature']}"
    assert verify([item])["ok"]


def test_code_node_reads_the_secret_from_env_or_refuses(verify) -> None:
    item = signed_item(callback_body())
    from_env = verify([item], variables={}, env={"REPLY_WORKER_CALLBACK_SECRET": SECRET})
    assert from_env["ok"], from_env

    plain = SECRET.removeprefix("whsec_")
    without_prefix = verify([item], variables={"REPLY_WORKER_CALLBACK_SECRET": plain})
    assert without_prefix["ok"], without_prefix

    unset = verify([item], variables={}, block_env=True)
    assert not unset["ok"]
    assert "REPLY_WORKER_CALLBACK_SECRET" in unset["error"]


@responses.activate
def test_code_node_verifies_what_the_worker_really_sends(verify) -> None:
    """The worker's own CallbackClient signs; the n8n Code node must accept it as is."""
    url = "https://n8n.example.test/webhook/whatsapp-reply"
    responses.add(responses.POST, url, status=200)
    payload = CallbackPayload.model_validate_json(callback_body())
    CallbackClient(timeout=5, secret=SECRET).post(url, payload, "f" * 32)

    request = responses.calls[0].request
    raw = request.body if isinstance(request.body, bytes) else request.body.encode()
    headers = {name.lower(): value for name, value in request.headers.items()}
    item = {
        "json": {"headers": headers, "params": {}, "query": {}, "body": json.loads(raw)},
        "binary": {
            "data": {"data": base64.b64encode(raw).decode(), "mimeType": "application/json"}
        },
    }
    outcome = verify([item])
    assert outcome["ok"], outcome
    assert outcome["result"][0]["json"] == payload.model_dump()


# --- the expressions of workflow 1, evaluated on a WhatsApp Trigger item ------------------


def trigger_item(**message: Any) -> dict[str, Any]:
    """One item as n8n's WhatsApp Trigger emits it: the `value` of a messages change."""
    text_message = {
        "from": "59112345678",
        "id": "wamid.HBgLNTkxMTIzNDU2NzgVAgASGBQ",
        "timestamp": "1728123456",
        "type": "text",
        "text": {"body": 'Hola, "quiero" una cita\npara mañana'},
    }
    return {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "123456789012345"},
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": "59112345678"}],
        "messages": [{**text_message, **message}],
        "field": "messages",
    }


@needs_node
def test_inbound_json_body_builds_a_valid_inbound_message(tmp_path: Path) -> None:
    request = only_node(load(INBOUND), "n8n-nodes-base.httpRequest")
    source = expression_source(request["parameters"]["jsonBody"])
    no_contact = trigger_item()
    del no_contact["contacts"]

    bodies = run_node(
        tmp_path, EXPRESSION, {"source": source, "items": [trigger_item(), no_contact]}
    )

    first = InboundMessage.model_validate(bodies[0])
    assert first.message_id == "wamid.HBgLNTkxMTIzNDU2NzgVAgASGBQ"
    assert first.sender == "59112345678"
    assert first.text == 'Hola, "quiero" una cita\npara mañana'
    assert first.name == "Ana"
    assert first.timestamp == 1728123456
    assert isinstance(bodies[0]["timestamp"], int)
    assert first.metadata == {"phone_number_id": "123456789012345"}

    second = InboundMessage.model_validate(bodies[1])
    assert second.name is None
    assert "name" not in bodies[1]


@needs_node
def test_inbound_filter_lets_only_text_messages_through(tmp_path: Path) -> None:
    check = only_node(load(INBOUND), "n8n-nodes-base.if")
    condition = check["parameters"]["conditions"]["conditions"][0]
    source = expression_source(condition["leftValue"])
    status_update = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": "123456789012345"},
        "statuses": [{"id": "wamid.x", "status": "read"}],
    }
    items = [trigger_item(), trigger_item(type="image", text=None), status_update]

    values = run_node(tmp_path, EXPRESSION, {"source": source, "items": items})

    assert [value == condition["rightValue"] for value in values] == [True, False, False]
    assert all(isinstance(value, str) for value in values)  # strict type validation holds
