"""Schemathesis hooks for the API run (tests/integration/test_schemathesis.py): SCHEMATHESIS_HOOKS names it.

They narrow generated values only where the API has a rule JSON Schema cannot state, so that a
schema-valid request is a valid one and `positive_data_acceptance` stays a strict check:
- `cursor` is opaque: only a `nextCursor` the API returned is one (anything else is rightly a 400);
- GET /api/usage: `from` must not be after `to` and the range must cover at most 366 days.
Both rules have their own tests (test_chats_api.py, test_security.py).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

import schemathesis

_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
MAX_RANGE_DAYS = 366


def _day(raw: Any) -> date | None:
    if not isinstance(raw, str) or not _DAY.fullmatch(raw):
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        return None


@schemathesis.hook
def map_query(context: schemathesis.HookContext, query: dict[str, Any] | None) -> dict[str, Any] | None:
    if not query or context.operation is None:
        return query
    query = dict(query)
    query.pop("cursor", None)
    if context.operation.path == "/api/usage" and "from" in query:
        day_from = _day(query["from"])
        day_to = _day(query["to"]) if "to" in query else datetime.now(UTC).date()
        if day_from is not None and day_to is not None:
            span = (day_to - day_from).days + 1
            if not 1 <= span <= MAX_RANGE_DAYS:
                del query["from"]  # the default, 29 days before `to`, always makes a valid range
    return query


def _breaks_a_cross_parameter_rule(operation_path: str, query: dict[str, Any]) -> str | None:
    """The field a valid-looking query breaks a rule of that JSON Schema cannot state, if any."""
    if query.get("cursor"):
        return "cursor"
    if operation_path == "/api/usage" and "from" in query:
        day_from = _day(query["from"])
        day_to = _day(query["to"]) if "to" in query else datetime.now(UTC).date()
        if (
            day_from is not None
            and day_to is not None
            and not 1 <= (day_to - day_from).days + 1 <= MAX_RANGE_DAYS
        ):
            return "from"
    return None


@schemathesis.hook
def filter_failure(
    context: schemathesis.HookContext, failure: Any, case: schemathesis.Case, response: schemathesis.Response
) -> bool:
    """The coverage phase does not run `map_query`: drop a rejection that the rules above explain.

    Kept: every failure but a 400 `validation_error` naming exactly the field whose rule the query broke.
    """
    if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 400:
        return True
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return True
    broken = _breaks_a_cross_parameter_rule(case.operation.path, dict(case.query or {}))
    return not (
        broken is not None and error.get("code") == "validation_error" and error.get("field") == broken
    )
