"""Tenants (router/tenants.py) on a fake clock: keys, quotas, and the file read again."""

from __future__ import annotations

import os

import pytest
import yaml
from fake_clock import FakeClock

from router.client_budget import OverBudget
from router.tenants import (
    DEFAULT_TENANT,
    RELOAD_CHECK_S,
    Priority,
    TenantOptions,
    Tenants,
    read_tenants,
)

CHAT_KEY, EVAL_KEY = "sk-chat-0123456789abcdef", "sk-eval-0123456789abcdef"


def write(path, tenants: list[dict]) -> None:
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    # A new change time even within the file system's timestamp resolution.
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))


@pytest.fixture
def tenants_file(tmp_path):
    path = tmp_path / "tenants.yaml"
    write(path, [
        {"name": "chat", "keys": [CHAT_KEY], "priority": "interactive",
         "requests_per_s": 2, "tokens_per_min": 600, "max_concurrent": 2},
        {"name": "eval", "keys": [EVAL_KEY], "priority": "batch"},
    ])
    return path


def tenants_of(path, clock: FakeClock, api_key: str | None = None) -> Tenants:
    return Tenants(TenantOptions(file=str(path)), api_key, clock)


def test_keys_name_their_tenant_and_nothing_else_gets_in(tenants_file):
    tenants = tenants_of(tenants_file, FakeClock())
    chat = tenants.identify(f"Bearer {CHAT_KEY}")
    assert chat.name == "chat" and chat.priority is Priority.INTERACTIVE
    assert tenants.identify(f"bearer {EVAL_KEY}".encode()).priority is Priority.BATCH
    for wrong in (None, "", CHAT_KEY, f"Basic {CHAT_KEY}", f"Bearer {CHAT_KEY}x",
                  "Bearer " + "k" * 300):
        assert tenants.identify(wrong) is None


def test_without_a_file_the_api_key_or_no_key_makes_the_default_tenant(tenants_file):
    assert Tenants(TenantOptions()).identify(None) == DEFAULT_TENANT
    keyed = Tenants(TenantOptions(), api_key="the-only-key-0123456789")
    assert keyed.identify("Bearer the-only-key-0123456789") == DEFAULT_TENANT
    assert keyed.identify(None) is None
    beside = tenants_of(tenants_file, FakeClock(), api_key="the-only-key-0123456789")
    assert beside.identify("Bearer the-only-key-0123456789") == DEFAULT_TENANT
    assert beside.identify(f"Bearer {CHAT_KEY}").name == "chat"


def test_requests_per_second_allow_a_seconds_burst_then_say_when(tenants_file):
    clock = FakeClock()
    tenants = tenants_of(tenants_file, clock)
    chat = tenants.identify(f"Bearer {CHAT_KEY}")
    tenants.arrive(chat)
    tenants.arrive(chat)
    with pytest.raises(OverBudget) as refused:
        tenants.arrive(chat)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    tenants.arrive(chat)
    eval_tenant = tenants.identify(f"Bearer {EVAL_KEY}")
    for _ in range(100):  # no limits: never refused
        tenants.arrive(eval_tenant)


def test_tokens_per_minute_count_what_a_request_holds_and_refund_what_it_did_not_use(
        tenants_file):
    clock = FakeClock()
    tenants = tenants_of(tenants_file, clock)
    chat = tenants.identify(f"Bearer {CHAT_KEY}")
    tenants.start(chat, 300)
    tenants.start(chat, 300)  # 600 a minute: the whole minute's worth
    tenants.end(chat, 0)
    with pytest.raises(OverBudget) as refused:
        tenants.start(chat, 100)
    assert refused.value.retry_after_s == pytest.approx(10.0)
    tenants.end(chat, 200)  # the second used 100 of its 300
    tenants.start(chat, 100)
    with pytest.raises(OverBudget, match="a minute"):
        tenants.start(chat, 601)  # more than a minute's worth: never


def test_generations_at_once_are_capped_and_freed_when_they_end(tenants_file):
    tenants = tenants_of(tenants_file, FakeClock())
    chat = tenants.identify(f"Bearer {CHAT_KEY}")
    tenants.start(chat, 1)
    tenants.start(chat, 1)
    with pytest.raises(OverBudget, match="2 generations running"):
        tenants.start(chat, 1)
    tenants.end(chat, 0)
    tenants.start(chat, 1)


def test_the_file_is_read_again_when_it_changes_and_a_broken_one_is_not_taken(tenants_file):
    clock = FakeClock()
    tenants = tenants_of(tenants_file, clock)
    new_key = "sk-new-0123456789abcdefgh"
    write(tenants_file, [{"name": "chat", "keys": [new_key]}])
    assert tenants.identify(f"Bearer {CHAT_KEY}") is not None  # not looked at yet
    clock.advance(RELOAD_CHECK_S)
    assert tenants.identify(f"Bearer {CHAT_KEY}") is None  # revoked
    assert tenants.identify(f"Bearer {new_key}").priority is Priority.STANDARD
    assert tenants.identify(f"Bearer {EVAL_KEY}") is None  # a tenant removed
    tenants_file.write_text("tenants: [{name: chat}]")  # no keys: refused, kept as it was
    os.utime(tenants_file, ns=(0, 10**18))
    clock.advance(RELOAD_CHECK_S)
    assert tenants.identify(f"Bearer {new_key}") is not None
    assert tenants.reload_errors == 1


@pytest.mark.parametrize("tenants, message", [
    ([{"name": "a", "keys": ["short"]}], "keys must be a list of strings of 16"),
    ([{"name": "a", "keys": [CHAT_KEY]}, {"name": "a", "keys": [EVAL_KEY]}],
     "named twice"),
    ([{"name": "a", "keys": [CHAT_KEY]}, {"name": "b", "keys": [CHAT_KEY]}],
     "is also 'a''s"),
    ([{"name": "a", "keys": [CHAT_KEY], "priority": "urgent"}], "priority must be one of"),
    ([{"name": "a", "keys": [CHAT_KEY], "rate": 3}], "unknown fields ['rate']"),
    ([{"name": "a", "keys": [CHAT_KEY], "max_concurrent": 1.5}], "max_concurrent must be"),
    ([{"name": "a", "keys": [CHAT_KEY], "requests_per_s": -1}], "requests_per_s must be"),
])
def test_a_bad_file_is_refused_saying_what_is_wrong(tmp_path, tenants, message):
    path = tmp_path / "tenants.yaml"
    write(path, tenants)
    with pytest.raises(ValueError) as refused:
        read_tenants(path)
    assert message in str(refused.value)
