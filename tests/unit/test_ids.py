"""The IDs that cross the wire. No server."""

from __future__ import annotations

import pytest

from mlflow_feedback_middleware.ids import (
    clean_principal_id,
    is_valid_client_request_id,
    is_valid_trace_id,
    new_client_request_id,
)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("tr-" + "a" * 32, True),
        ("0" * 32, True),
        ("trace:/catalog.schema/" + "f" * 32, True),
        ("tr-" + "A" * 32, False),
        ("tr-../../experiments", False),
        ("tr-" + "a" * 33, False),
        ("", False),
    ],
)
def test_trace_ids_are_only_mlflows_forms(value: str, valid: bool) -> None:
    assert is_valid_trace_id(value) is valid


def test_client_request_ids_fit_mlflows_column_and_a_header() -> None:
    generated = new_client_request_id()
    assert len(generated) == 32 and is_valid_client_request_id(generated)
    assert is_valid_client_request_id("req-1:a@b/c")
    for bad in ("x" * 51, "a b", 'a"b', "a\r\nb", "-leading"):
        assert not is_valid_client_request_id(bad)


def test_principal_ids_are_printable_and_bounded() -> None:
    assert clean_principal_id("alice@example.com") == "alice@example.com"
    assert clean_principal_id(" padded") is None and clean_principal_id("x" * 251) is None
    assert clean_principal_id("line\nbreak") is None and clean_principal_id(None) is None
