"""Request and response schemas: protobuf messages, and a function's parameters.

``add_model(ml, schema=MyRequest, response_schema=MyResponse)`` with generated protobuf
message classes (``protoc --python_out``, or built at run time with ``descriptor_pb2`` and
``message_factory``): a JSON body is parsed into ``MyRequest`` with
``google.protobuf.json_format`` (unknown fields, wrong types and out-of-range numbers are a
400 naming the field); the model's answer is parsed into ``MyResponse`` before it is sent,
and an answer that does not fit is a 500 (logged; the client gets no partial answer).
The model receives the JSON fields the client sent, as for a JSON Schema.

A model without a schema is documented by its ``predict`` signature
(:func:`signature_schema`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from ..engine.errors import InputError, ModelError

__all__ = ["check_response", "is_message_class", "json_schema_of_message", "signature_schema",
           "validate_request"]

logger = logging.getLogger(__name__)


def is_message_class(schema: Any) -> bool:
    """Whether ``schema`` is a generated protobuf message class."""
    return isinstance(schema, type) and hasattr(schema, "DESCRIPTOR") and hasattr(
        schema, "FromString")


def validate_request(body: dict[str, Any], message_class: Any) -> dict[str, Any]:
    """Check a JSON body against a protobuf message class; the body unchanged.

    Raises:
        InputError: the body does not parse as the message (the parser's message names the
            field).
    """
    from google.protobuf import json_format

    try:
        json_format.ParseDict(body, message_class())
    except json_format.ParseError as exc:
        raise InputError(f"the body is not a valid {message_class.DESCRIPTOR.full_name}: "
                         f"{exc}") from None
    return body


def check_response(value: Any, message_class: Any, model: str) -> None:
    """Check the model's answer against the response message.

    Raises:
        ModelError: (500) the answer does not parse as the message; logged with the reason.
    """
    from google.protobuf import json_format

    name = message_class.DESCRIPTOR.full_name
    try:
        if not isinstance(value, dict):
            raise json_format.ParseError(f"the answer is a {type(value).__name__}, not an object")
        json_format.ParseDict(value, message_class())
    except json_format.ParseError as exc:
        logger.error("model %s answered something that is not a valid %s: %s", model, name, exc)
        raise ModelError(f"the model's answer does not match its response schema {name}; "
                         "see the server log") from None


_SCALARS: dict[str, dict[str, Any]] = {
    "TYPE_DOUBLE": {"type": "number"}, "TYPE_FLOAT": {"type": "number"},
    "TYPE_INT32": {"type": "integer"}, "TYPE_SINT32": {"type": "integer"},
    "TYPE_SFIXED32": {"type": "integer"}, "TYPE_UINT32": {"type": "integer", "minimum": 0},
    "TYPE_FIXED32": {"type": "integer", "minimum": 0},
    # 64-bit integers: JSON numbers or decimal strings (proto3's JSON mapping).
    "TYPE_INT64": {"type": ["integer", "string"]}, "TYPE_SINT64": {"type": ["integer", "string"]},
    "TYPE_SFIXED64": {"type": ["integer", "string"]},
    "TYPE_UINT64": {"type": ["integer", "string"]}, "TYPE_FIXED64": {"type": ["integer", "string"]},
    "TYPE_BOOL": {"type": "boolean"}, "TYPE_STRING": {"type": "string"},
    "TYPE_BYTES": {"type": "string", "contentEncoding": "base64"},
}


def json_schema_of_message(message_class: Any, _depth: int = 0) -> dict[str, Any]:
    """A JSON Schema for the proto3 JSON form of a message (for the OpenAPI document)."""
    from google.protobuf.descriptor import FieldDescriptor

    descriptor = getattr(message_class, "DESCRIPTOR", message_class)
    properties: dict[str, Any] = {}
    type_names = {v: k for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    for field in descriptor.fields:
        kind = type_names.get(field.type, "")
        if kind in ("TYPE_MESSAGE", "TYPE_GROUP"):
            schema: dict[str, Any] = (json_schema_of_message(field.message_type, _depth + 1)
                                      if _depth < 8 else {"type": "object"})
        elif kind == "TYPE_ENUM":
            schema = {"enum": [v.name for v in field.enum_type.values]}
        else:
            schema = dict(_SCALARS.get(kind, {}))
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:
            repeated = field.label == FieldDescriptor.LABEL_REPEATED
        if repeated:
            schema = {"type": "array", "items": schema}
        properties[field.json_name] = schema
    return {"type": "object", "title": descriptor.full_name, "properties": properties,
            "additionalProperties": False}


def signature_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """The JSON Schema of a JSON body that calls ``function`` with keyword arguments: one
    property per parameter (any value), those without a default required."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    for p in parameters:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            properties[p.name] = {}
            if p.default is p.empty:
                required.append(p.name)
    result: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        result["required"] = required
    return result
