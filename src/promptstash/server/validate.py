"""Typed access to a JSON request body: wrong types and out-of-range values become 400s naming the field."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from promptstash.server.errors import APIError

_MISSING = object()
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: legal JSON, but maybe unpaired


def parse_json_object(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig")  # strict: no surrogates (json.loads(bytes) would pass them through)
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8, an int over 4300 digits
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise APIError(400, "request body has an unpaired UTF-16 surrogate escape (\\ud800-\\udfff) "
                                "in a string") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


class Body:
    """One JSON object (the request or a nested part of it); `where` prefixes field names in errors."""

    def __init__(self, data: dict[str, Any], where: str = "") -> None:
        self.data = data
        self.where = where

    def name(self, field: str) -> str:
        return f"{self.where}.{field}" if self.where else field

    def _get(self, field: str, required: bool) -> Any:
        value = self.data.get(field, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise APIError(400, f"{self.name(field)}: field required", param=self.name(field))
            return _MISSING
        return value

    def fail(self, field: str, message: str) -> APIError:
        return APIError(400, f"{self.name(field)}: {message}", param=self.name(field))

    def str(self, field: str, default: Any = None, *, required: bool = False,
            choices: tuple[str, ...] | None = None) -> Any:
        value = self._get(field, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {type_name(value)}")
        if choices is not None and value not in choices:
            raise self.fail(field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def int(self, field: str, default: Any = None, *, required: bool = False, min: int | None = None,
            max: int | None = None) -> Any:
        value = self._get(field, required)
        if value is _MISSING:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, f"expected an integer, got {type_name(value)}")
        if min is not None and value < min:
            raise self.fail(field, f"must be >= {min}, got {value}")
        if max is not None and value > max:
            raise self.fail(field, f"must be <= {max}, got {value}")
        return value

    def num(self, field: str, default: Any = None, *, min: float | None = None, max: float | None = None) -> Any:
        value = self._get(field, False)
        if value is _MISSING:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            got = "a non-finite number" if isinstance(value, float) else type_name(value)
            raise self.fail(field, f"expected a finite number, got {got}")
        if min is not None and value < min:
            raise self.fail(field, f"must be >= {min}, got {value}")
        if max is not None and value > max:
            raise self.fail(field, f"must be <= {max}, got {value}")
        return float(value)

    def bool(self, field: str, default: Any = None) -> Any:
        value = self._get(field, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.fail(field, f"expected a boolean, got {type_name(value)}")
        return value

    def obj(self, field: str, *, required: bool = False) -> Body | None:
        value = self._get(field, required)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            raise self.fail(field, f"expected an object, got {type_name(value)}")
        return Body(value, self.name(field))

    def list(self, field: str, *, required: bool = False) -> list[Any] | None:
        value = self._get(field, required)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            raise self.fail(field, f"expected an array, got {type_name(value)}")
        return value

    def stop(self, field: str, max_items: int) -> tuple[str, ...]:
        """A stop field: a string or an array of strings."""
        value = self._get(field, False)
        if value is _MISSING:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self.fail(field, "expected a string or an array of strings")
        if len(items) > max_items:
            raise self.fail(field, f"at most {max_items} stop sequences, got {len(items)}")
        if any(not s for s in items):
            raise self.fail(field, "stop sequences must not be empty")
        return tuple(items)
