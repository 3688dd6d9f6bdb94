"""The OpenAPI document (/openapi.json): the contract as the server enforces it, so generated clients and API
fuzzers can trust it.

FastAPI's generated document lacks what the hand-parsed POST bodies need, so it is completed here: the request
schemas (with the ranges SamplingParams checks, stated as documentation keywords in protocol.py), the model's
token-id ranges, every error status an operation can answer with the OpenAI error schema, the event-stream
responses, and /metrics' Prometheus text format.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST

from .protocol import REQUEST_MODELS, TOKEN_ID

ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

ERROR_MEANINGS = {
    400: "Invalid request (the message and param say which field and why)",
    401: "Missing or wrong API key (only when the server requires one)",
    404: "Unknown model",
    413: "Request body larger than --max-request-bytes",
    429: "Too many requests",
    503: "Server at capacity, shutting down, or its engine stopped; retry later",
}
# Error statuses per operation (method, path).
POST_ERRORS = (400, 401, 404, 413, 429, 503)
OPERATION_ERRORS = {
    ("get", "/health"): (503,),
    ("get", "/v1/models"): (401,),
    ("get", "/v1/models/{model_id}"): (401, 404),
    ("post", "/v1/completions"): POST_ERRORS,
    ("post", "/v1/chat/completions"): POST_ERRORS,
    ("post", "/tokenize"): POST_ERRORS,
    ("post", "/detokenize"): POST_ERRORS,
}
STREAMING = ("/v1/completions", "/v1/chat/completions")
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk (or an error object), then [DONE]"}}}


def _with_token_id_maximum(node: Any, maximum: int) -> Any:
    if isinstance(node, list):
        return [_with_token_id_maximum(n, maximum) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _with_token_id_maximum(v, maximum) for k, v in node.items()}
    if out.get(TOKEN_ID):
        out["maximum"] = maximum
    return out


def build_openapi(app: FastAPI, vocab_size: int | None, tokenizer_size: int | None) -> dict:
    """The completed document of app; token ids below vocab_size (the model's), detokenize ids below
    tokenizer_size (where known)."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in REQUEST_MODELS.values():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    if vocab_size:
        components.update(_with_token_id_maximum(components, vocab_size - 1))
    if tokenizer_size:
        tokens = components["DetokenizeRequest"]["properties"]["tokens"]["items"]
        tokens["maximum"] = min(tokens.get("maximum", tokenizer_size - 1), tokenizer_size - 1)
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which this server never sends
        components.pop(name, None)
    components["ErrorResponse"] = ERROR_SCHEMA
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}

    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in OPERATION_ERRORS.get((method, path), ()):
                responses[str(status)] = {"description": ERROR_MEANINGS[status], "content": error_ref}
            if path in STREAMING:
                responses["200"]["description"] = "The completion; with stream: true, server-sent events"
                responses["200"]["content"] = {"application/json": {"schema": {"type": "object"}},
                                               "text/event-stream": {"schema": SSE_EVENT}}
            if path == "/metrics":
                responses["200"]["content"] = {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}
    return schema
