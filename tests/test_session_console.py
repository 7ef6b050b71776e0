"""The console's list of errors printed without a traceback names classes that exist: a module
moved or renamed would silently turn those refusals back into tracebacks."""
from __future__ import annotations

from calbench.instruments import load_object
from calbench.session_console import EXPECTED_ERRORS, expected_error_types


def test_every_expected_error_class_resolves():
    for path in EXPECTED_ERRORS:
        cls = load_object(path)
        assert isinstance(cls, type) and issubclass(cls, Exception), path
    assert len(expected_error_types()) == len(EXPECTED_ERRORS)
