"""The OpenAPI 3.1 description of the ``km-edge serve`` API, served at ``GET /openapi.json``.

Written out rather than generated, so the limits a client must respect are stated where a client
reads them; ``tests/test_serve.py`` checks it names every route the app has.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["openapi_document"]


def _version() -> str:
    try:
        return metadata.version("km-edge")
    except metadata.PackageNotFoundError:
        return "0"


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(options) -> dict:
    """The document for a server with these ``ServeOptions``."""
    top = {"type": "object", "properties": {
        "label": {"type": "string"}, "index": {"type": "integer"},
        "probability": {"type": "number", "minimum": 0, "maximum": 1}}}
    secured = [{"bearer": []}] if options.token else []
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "km-edge serve",
            "version": _version(),
            "description": "One device process serving many Kernel Modulation task packs over one "
                           "frozen base. Packs are hot-swapped from the packs folder; every answer "
                           "names the pack version that produced it.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "status"], "properties": {
                    "error": {"type": "string", "description": "one line"},
                    "status": {"type": "integer"},
                    "reason": {"type": "string", "description": "machine-readable refusal reason"}}},
                "Task": {"type": "object", "properties": {
                    "task": {"type": "string"}, "pack_version": {"type": "integer"},
                    "base_id": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
                    "key_id": {"type": "string"}, "created": {"type": "string"},
                    "loaded_at": {"type": "string"}, "file": {"type": "string"},
                    "sha256": {"type": "string"}, "session_cached": {"type": "boolean"}}},
                "Prediction": {"type": "object", "properties": {
                    "image": {"type": "string"},
                    "top": {"type": "array", "items": top},
                    "error": {"type": "string", "description": "this image could not be read"}}},
            },
        },
        "security": secured,
        "paths": {
            "/healthz": {"get": {
                "summary": "Ready once the base and at least one task pack are loaded (no token needed).",
                "security": [],
                "responses": {"200": {"description": "ready"}, "503": {"description": "no pack loaded yet"}},
            }},
            "/v1/tasks": {"get": {
                "summary": "Every loaded task (version, base_id, labels, key id, loaded-at) and refused files.",
                "responses": {"200": {"description": "tasks", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "base_id": {"type": "string"},
                        "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                        "refused": {"type": "array", "items": {"type": "object"}}}}}}},
                    "401": _error("missing or wrong bearer token")},
            }},
            "/v1/tasks/{task}/predict": {"post": {
                "summary": "Top-k labels for one image (raw body) or several (multipart file parts).",
                "parameters": [
                    {"name": "task", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "top_k", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": options.max_top_k, "default": 5}},
                ],
                "requestBody": {"required": True, "description":
                                f"at most {options.max_body_bytes} bytes, {options.max_images} images, "
                                f"{options.max_pixels} pixels per image",
                                "content": {
                                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                                    "multipart/form-data": {"schema": {"type": "object", "additionalProperties": {
                                        "type": "string", "format": "binary"}}}}},
                "responses": {
                    "200": {"description": "predictions and the pack version that made them",
                            "content": {"application/json": {"schema": {"type": "object", "properties": {
                                "task": {"type": "string"}, "pack_version": {"type": "integer"},
                                "key_id": {"type": "string"}, "base_id": {"type": "string"},
                                "predictions": {"type": "array",
                                                "items": {"$ref": "#/components/schemas/Prediction"}}}}}}},
                    "400": _error("no readable image, bad multipart body, bad top_k, too many images"),
                    "401": _error("missing or wrong bearer token"),
                    "404": _error("no such task loaded"),
                    "409": _error("the task's pack was refused (e.g. older than the recorded version)"),
                    "413": _error("body larger than the limit"),
                    "503": _error("work queue full (see Retry-After)"),
                },
            }},
            "/metrics": {"get": {
                "summary": "Prometheus text format: requests and errors by task and code, latency "
                           "histogram, pack loads, refusals by reason, session cache hits.",
                "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
            }},
            "/openapi.json": {"get": {"summary": "This document.",
                                      "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }
