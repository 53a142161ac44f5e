"""The OpenAPI 3 document of the ``/v1`` API, served at ``GET /v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from mip.protocol.dtypes import BY_NAME

__all__ = ["PATHS", "openapi_document"]

#: every path the API serves (the test suite checks these against the routes).
PATHS = ("/v1/health", "/v1/inference", "/v1/inference/{request_id}", "/v1/models",
         "/v1/models/{model_id}", "/v1/openapi.json")

_REF = "#/components/schemas/"


def _json(schema: str | dict, description: str, headers: dict | None = None) -> dict:
    body = {"$ref": _REF + schema} if isinstance(schema, str) else schema
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": body}}}
    if headers:
        response["headers"] = headers
    return response


def _errors(*statuses: int) -> dict:
    text = {400: "Malformed request: bad JSON, missing or mistyped fields, inputs that do "
                 "not match the model",
            401: "Missing or invalid credentials",
            404: "No such model, version or job (finished jobs expire after the retention)",
            413: "Request body larger than the configured limit",
            429: "Rate limit exceeded (rate_limited) or too many failed authentications "
                 "from this address (too_many_auth_failures); retry after the Retry-After "
                 "seconds",
            500: "The server failed",
            503: "The job queue is full, or the model is not ready"}
    out = {}
    for status in statuses:
        headers = None
        if status == 429:
            headers = {"Retry-After": {"description": "seconds until a request is admitted",
                                       "schema": {"type": "integer"}}}
        out[str(status)] = _json("Error", text[status], headers)
    return out


_RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "requests allowed per period (per identity)",
                          "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "requests left right now",
                              "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"description": "seconds until the full limit is available again",
                          "schema": {"type": "integer"}},
}


def _tensor(with_data: bool) -> dict:
    properties: dict[str, Any] = {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": list(BY_NAME)},
        "shape": {"type": "array", "items": {"type": "integer"}},
    }
    required = ["name", "datatype", "shape"]
    if with_data:
        properties["data"] = {"type": "array", "description": "row-major values, flat or "
                              "nested; BYTES elements are UTF-8 strings", "items": {}}
        properties["parameters"] = {"type": "object"}
        required.append("data")
    return {"type": "object", "required": required, "properties": properties}


_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string", "example": "invalid_input"},
                       "message": {"type": "string"},
                       "details": {"type": "object"}}}}},
    "Health": {"type": "object", "required": ["status", "timestamp"], "properties": {
        "status": {"type": "string", "enum": ["healthy"]},
        "timestamp": {"type": "string", "format": "date-time"}}},
    "Tensor": _tensor(True),
    "TensorSpec": _tensor(False),
    "InferenceRequestBody": {
        "type": "object", "required": ["inputs"], "description":
        "an Open Inference Protocol (KServe v2) REST inference request body",
        "properties": {"inputs": {"type": "array", "items": {"$ref": _REF + "Tensor"}},
                       "outputs": {"type": "array", "items": {
                           "type": "object", "required": ["name"],
                           "properties": {"name": {"type": "string"}}}},
                       "parameters": {"type": "object"}}},
    "InferenceResponseBody": {
        "type": "object", "description": "an Open Inference Protocol REST inference response",
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "outputs": {"type": "array", "items": {"$ref": _REF + "Tensor"}}}},
    "SubmitRequest": {
        "type": "object", "required": ["model_id", "input_data"], "additionalProperties": False,
        "properties": {
            "model_id": {"type": "string", "description": "'name' (the highest ready "
                         "version) or 'name:version'", "example": "identity:1"},
            "input_data": {"$ref": _REF + "InferenceRequestBody"},
            "parameters": {"type": "object", "properties": {
                "timeout": {"type": "number", "description": "seconds the model may take "
                            "once the job runs; later it fails with deadline_exceeded"}}}}},
    "Submitted": {"type": "object", "required": ["request_id", "status"], "properties": {
        "request_id": {"type": "string"}, "status": {"type": "string", "enum": ["queued"]}}},
    "Job": {"type": "object", "required": ["request_id", "status", "result", "timestamp"],
            "properties": {
                "request_id": {"type": "string"},
                "status": {"type": "string",
                           "enum": ["queued", "processing", "completed", "failed"]},
                "model_id": {"type": "string"},
                "result": {"oneOf": [{"$ref": _REF + "InferenceResponseBody"},
                                     {"type": "null"}]},
                "error": {"type": "object", "description": "set when failed",
                          "properties": {"code": {"type": "string"},
                                         "message": {"type": "string"}}},
                "timestamp": {"type": "string", "format": "date-time",
                              "description": "when the job last changed"},
                "created": {"type": "string", "format": "date-time"},
                "attempts": {"type": "integer",
                             "description": "deliveries to workers so far"}}},
    "ModelSummary": {"type": "object", "required": ["id", "name", "version", "status"],
                     "properties": {
                         "id": {"type": "string", "example": "mlp:1"},
                         "name": {"type": "string"}, "version": {"type": "string"},
                         "status": {"type": "string", "enum": ["active", "deprecated"],
                                    "description": "active: the version 'name' alone "
                                    "reaches; deprecated: any other version"},
                         "state": {"type": "string",
                                   "enum": ["READY", "LOADING", "UNAVAILABLE", "UNLOADING"]},
                         "ready": {"type": "boolean"}}},
    "ModelList": {"type": "object", "required": ["models"], "properties": {
        "models": {"type": "array", "items": {"$ref": _REF + "ModelSummary"}}}},
    "ModelDetails": {"type": "object", "required": [
        "id", "name", "version", "framework", "input_schema", "output_schema"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "version": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "status": {"type": "string", "enum": ["active", "deprecated"]},
        "framework": {"type": "string", "example": "onnxruntime_onnx"},
        "input_schema": {"type": "object", "properties": {
            "inputs": {"type": "array", "items": {"$ref": _REF + "TensorSpec"}}}},
        "output_schema": {"type": "object", "properties": {
            "outputs": {"type": "array", "items": {"$ref": _REF + "TensorSpec"}}}}}},
}


def openapi_document(*, open_health: bool = False, rate: str = "1000/min",
                     auth_failures: str = "10/min") -> dict:
    """The OpenAPI 3.1 document (a JSON-able dict) for the API as configured."""
    def op(summary: str, responses: dict, *, public: bool = False, **extra) -> dict:
        for response in responses.values():
            if "content" in response and not response.get("headers"):
                response["headers"] = dict(_RATE_HEADERS)
        operation = {"summary": summary, "responses": responses, **extra}
        if public:
            operation["security"] = [{}, {"bearer": []}, {"apiKey": []}]
        return operation

    model_id = {"name": "model_id", "in": "path", "required": True,
                "schema": {"type": "string"}, "description": "'name' or 'name:version'"}
    request_id = {"name": "request_id", "in": "path", "required": True,
                  "schema": {"type": "string"}}
    paths = {
        "/v1/health": {"get": op("Liveness of the control plane",
                                 {"200": _json("Health", "Healthy"), **_errors(401, 429)},
                                 public=open_health)},
        "/v1/inference": {"post": op(
            "Submit an inference job (stored durably before the answer)",
            {"202": _json("Submitted", "Queued; poll GET /v1/inference/{request_id}, or "
                          "subscribe to the MSIP topic jobs.{request_id} when push is on",
                          {"Location": {"schema": {"type": "string"}}, **_RATE_HEADERS}),
             **_errors(400, 401, 404, 413, 429, 500, 503)},
            requestBody={"required": True, "content": {"application/json": {
                "schema": {"$ref": _REF + "SubmitRequest"}}}})},
        "/v1/inference/{request_id}": {"get": op(
            "A job's status and, once completed, its result",
            {"200": _json("Job", "The job"), **_errors(401, 404, 429, 500)},
            parameters=[request_id])},
        "/v1/models": {"get": op("The model registry: every model version",
                                 {"200": _json("ModelList", "Models"),
                                  **_errors(401, 429, 500)})},
        "/v1/models/{model_id}": {"get": op(
            "A model version's framework and input/output schema",
            {"200": _json("ModelDetails", "The model"), **_errors(401, 404, 429, 500, 503)},
            parameters=[model_id])},
        "/v1/openapi.json": {"get": op("This document",
                                       {"200": _json({"type": "object"}, "OpenAPI 3.1"),
                                        **_errors(401, 429)})},
    }
    assert tuple(paths) == PATHS
    return {
        "openapi": "3.1.0",
        "info": {"title": "mip MIaaS control plane", "version": "1",
                 "description": "Asynchronous inference jobs, a model registry and health. "
                 "Every request needs an API key (Authorization: Bearer KEY or X-API-Key) "
                 "or an OAuth2 JWT bearer token" + (
                     "; /v1/health is open to unauthenticated probes" if open_health else "")
                 + f". Rate limit: {rate} per identity (429 with Retry-After beyond it). "
                 f"Failed authentications: {auth_failures} per client address; beyond them "
                 "the address gets 429 with Retry-After whatever it sends."},
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "an API key, or an OAuth2 JWT access token"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
        "security": [{"bearer": []}, {"apiKey": []}],
    }
