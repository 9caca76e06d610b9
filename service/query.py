"""One place that validates query parameters, all of them at once, more strictly than Litestar does.

Litestar converts query strings leniently (``limit=1e3`` and ``limit=1.0`` pass as integers) and stops
at the first invalid parameter it finds, while checks made inside a handler (timestamps) run only after
every typed parameter passed. :func:`check_query` runs as a guard before any of that and checks each
query parameter the handler declares:

* an ``int`` (optionally ``None``): ASCII digits only (no sign, exponent, point or leading zero),
  within the declared ``ge`` / ``le``;
* a ``Literal`` of strings: one of its values;
* a ``str`` declared with ``format=OpenAPIFormat.DATE_TIME``: an RFC 3339 timestamp with an offset;
* a ``list[X]`` (optionally ``None``): may be repeated (``?status=failed&status=cancelled``), each value
  checked as an ``X``, at most the declared ``max_items`` values;
* any other parameter given once (a repeated scalar is refused rather than one of its values picked).

Every failure is listed in one 400 problem's ``errors`` (``name``, ``source``, ``message``).
"""

from __future__ import annotations

import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from litestar.connection import ASGIConnection
from litestar.exceptions import ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import OpenAPIFormat
from litestar.params import KwargDefinition

from repositories.domain import InvalidParameter, parse_timestamp

_DIGITS = re.compile(r"0|[1-9][0-9]{0,17}")
"""A whole number as Litestar takes it: ASCII digits, no sign, no leading zero, no exponent."""


async def check_query(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Litestar guard: the request's query parameters fit the handler's declarations.

    A coroutine function although it awaits nothing: Litestar runs a synchronous guard in a worker
    thread, a thread hop on every request.

    Raises:
        ValidationException: (400 ``invalid-request``) naming every invalid parameter.
    """
    query = connection.query_params
    if not query:
        return
    path_params = connection.scope.get("path_params") or {}
    errors: list[dict[str, str]] = []
    for name, field in handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if kwarg is not None and not isinstance(kwarg, KwargDefinition):
            continue  # a dependency or a body
        if kwarg is not None and (getattr(kwarg, "header", None) or getattr(kwarg, "cookie", None)):
            continue
        key = (getattr(kwarg, "query", None) or getattr(kwarg, "name", None)) if kwarg is not None else None
        key = key or name
        if key not in query or name in path_params:
            continue
        values = query.getall(key)
        item = _list_item(field.annotation)
        if item is None:
            if len(values) > 1:  # Litestar would use the last value, unchecked if the first one passed
                errors.append({"key": key, "source": "query", "message": "must be given once"})
                continue
            message = _problem(field.annotation, kwarg, values[0], key)
        elif kwarg is not None and kwarg.max_items is not None and len(values) > kwarg.max_items:
            message = f"may be given at most {kwarg.max_items} times"
        else:
            message = next((m for v in values if (m := _problem(item, kwarg, v, key)) is not None), None)
        if message is not None:
            errors.append({"key": key, "source": "query", "message": message})
    if errors:
        raise ValidationException(detail="invalid query parameters", extra=errors)


def _problem(annotation: Any, kwarg: KwargDefinition | None, value: str, key: str) -> str | None:
    """Why ``value`` does not fit ``annotation`` (and ``kwarg``'s bounds and format), or None."""
    base = _without_none(annotation)
    if base is int:
        if not _DIGITS.fullmatch(value):
            return f"must be a whole number written in digits only{_bounds(kwarg)}"
        number = int(value)
        if kwarg is not None and (
            (kwarg.ge is not None and number < kwarg.ge) or (kwarg.le is not None and number > kwarg.le)
        ):
            return f"must be a whole number{_bounds(kwarg)}"
        return None
    if get_origin(base) is Literal:
        allowed = [str(option) for option in get_args(base)]
        return None if value in allowed else f"must be one of {', '.join(allowed)}"
    if base is str and kwarg is not None and kwarg.format == OpenAPIFormat.DATE_TIME:
        try:
            parse_timestamp(value, key)
        except InvalidParameter as exc:
            return str(exc).removeprefix(f"{key} ")
    return None


def _list_item(annotation: Any) -> Any | None:
    """``X`` of a ``list[X]`` (or ``list[X] | None``) parameter, which may be repeated; None for a scalar."""
    base = _without_none(annotation)
    if get_origin(base) is list:
        args = get_args(base)
        return args[0] if args else str
    return None


def _bounds(kwarg: KwargDefinition | None) -> str:
    if kwarg is None or (kwarg.ge is None and kwarg.le is None):
        return ""
    if kwarg.ge is not None and kwarg.le is not None:
        return f" from {kwarg.ge:g} to {kwarg.le:g}"
    return f" of at least {kwarg.ge:g}" if kwarg.ge is not None else f" of at most {kwarg.le:g}"


def _without_none(annotation: Any) -> Any:
    """``X`` from ``X | None`` / ``Optional[X]`` (``Annotated`` already unwrapped by Litestar)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
