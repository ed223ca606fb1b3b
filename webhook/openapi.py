"""`GET /openapi.json`: the webhook's contract, generated from the pydantic models, so
the document cannot drift from what the code validates (the fuzz tests rely on it)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic import BaseModel

from common.messages import Conversation, InboundMessage
from common.settings import Settings

bp = Blueprint("openapi", __name__)

_REF = "#/components/schemas/{model}"

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, {"$ref": _REF.format(model="Error")})


def build_document(settings: Settings) -> dict[str, Any]:
    components: dict[str, Any] = {"Error": _ERROR}
    inbound = _schema(InboundMessage, components)
    components["InboundMessage"]["properties"]["text"]["maxLength"] = settings.max_text_length
    conversation = _schema(Conversation, components)
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    admin = [{"bearer": []}, {"adminToken": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "n8n WhatsApp reply webhook", "version": "1"},
        "paths": {
            "/webhook": {
                "post": {
                    "summary": "Accept one WhatsApp message for an automatic reply",
                    "security": [{"bearer": []}, {"webhookToken": []}, {"metaSignature": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": inbound}},
                    },
                    "responses": {
                        "202": _json("Queued", status),
                        "200": _json("Duplicate message id", status),
                        "400": _error("Body is not JSON"),
                        "401": _error("Missing or invalid credentials"),
                        "413": _error("Body too large"),
                        "415": _error("Not application/json"),
                        "422": _error("A field is missing or invalid"),
                        "429": _error("Rate limit or pending cap reached; see Retry-After"),
                        "503": _error("Redis unreachable or refusing writes; see Retry-After"),
                    },
                }
            },
            "/health": {"get": {"responses": {"200": _json("Process is up", status)}}},
            "/ready": {
                "get": {
                    "responses": {
                        "200": _json("Redis answers", status),
                        "503": _error("Redis unreachable or refusing writes"),
                    }
                }
            },
            "/chat/history/{session_id}": {
                "parameters": [
                    {
                        "name": "session_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": r"^[^\s{}]{1,128}$"},
                    }
                ],
                "get": {
                    "security": admin,
                    "responses": {
                        "200": _json("The conversation", conversation),
                        "401": _error("Missing or invalid admin credentials"),
                        "404": _error("No such conversation"),
                    },
                },
                "delete": {
                    "security": admin,
                    "responses": {
                        "200": _json("Erased", status),
                        "401": _error("Missing or invalid admin credentials"),
                        "404": _error("No such conversation"),
                    },
                },
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "webhookToken": {"type": "apiKey", "in": "header", "name": "X-Webhook-Token"},
                "adminToken": {"type": "apiKey", "in": "header", "name": "X-Admin-Token"},
                "metaSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Hub-Signature-256",
                },
            },
        },
    }


def init_app(app: Flask, settings: Settings) -> None:
    """Built once at start-up: the document depends only on the settings."""
    app.config["OPENAPI_DOCUMENT"] = build_document(settings)
    app.register_blueprint(bp)


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(current_app.config["OPENAPI_DOCUMENT"])
