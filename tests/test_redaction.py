"""``redact_secrets``: what may leave a worker of a spec (Flower, events, stored results)."""

from __future__ import annotations

import pytest

from app.core.redaction import REDACTED, redact_secrets


@pytest.mark.parametrize(("value", "expected"), [
    ({"headers": {"Authorization": "Bearer x", "X-Trace": "1"}}, {"headers": {"Authorization": REDACTED,
                                                                              "X-Trace": REDACTED}}),
    ({"hf_token": "x", "api-key": "y", "apiKey": "z", "password": "p", "client_secret": "s"},
     {"hf_token": REDACTED, "api-key": REDACTED, "apiKey": REDACTED, "password": REDACTED, "client_secret": REDACTED}),
    ({"max_new_tokens": 5, "total_tokens": 9, "token": None}, {"max_new_tokens": 5, "total_tokens": 9, "token": None}),
    ({"url": "https://user:pw@h.example/a.zip?sig=abc"}, {"url": "https://h.example/a.zip?…"}),
    ({"items": ["see https://x.example/?q=1 here", "https://x.example/p"]},
     {"items": ["see https://x.example/?q=1 here", "https://x.example/p"]}),
    (({"headers": {"a": "b"}},), ({"headers": {"a": REDACTED}},)),
])
def test_redact_secrets(value: object, expected: object) -> None:
    assert redact_secrets(value) == expected
