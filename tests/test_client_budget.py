"""Per-client budgets of the router's time (router/client_budget.py), on a fake clock."""

import pytest

from router.client_budget import (
    MAX_WAITING,
    ClientBudget,
    ClientLimits,
    ClientNames,
    OverBudget,
    client_of,
)
from router.http_budget import ConnectionsByClient


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def budget(share=0.5, burst_s=2.0) -> tuple[ClientBudget, FakeClock]:
    clock = FakeClock()
    return ClientBudget(ClientLimits(share=share, burst_s=burst_s), clock), clock


def test_a_client_within_its_burst_starts_at_once_then_waits_at_its_share():
    b, clock = budget(share=0.5, burst_s=2.0)
    # 0.25 s of the router's time at a half share is 0.5 s of budget: four fit the burst
    # of 2 s, the fifth starts at once too (the burst is how far ahead one may run).
    assert [b.admit("a", 0.25) for _ in range(5)] == [0.0] * 5
    assert b.admit("a", 0.25) == pytest.approx(0.5)
    b.waited("a")
    clock.now += 0.5  # the budget refills at the share: the next is due again now
    assert b.admit("a", 0.25) == pytest.approx(0.5)
    b.waited("a")


def test_one_client_over_its_budget_never_delays_another():
    b, _ = budget()
    for _ in range(5):  # 1 s of budget each: the fifth waits 2 s, the burst
        b.admit("flood", 0.5)
    with pytest.raises(OverBudget):
        b.admit("flood", 0.5)
    assert b.admit("polite", 0.001) == 0.0


def test_a_request_that_would_wait_longer_than_the_burst_is_refused_with_a_retry_time():
    b, clock = budget(share=0.5, burst_s=2.0)
    b.admit("a", 3.0)  # 6 s of budget, taken at once: its successors pay
    with pytest.raises(OverBudget) as refused:
        b.admit("a", 0.001)  # due in 6 - 2 = 4 s, past the 2 s it may wait
    assert refused.value.retry_after_s == pytest.approx(2.0)
    # A retry then waits the burst at most (and pays the 2 ms the refusal cost).
    clock.now += refused.value.retry_after_s + 0.1
    assert b.admit("a", 0.001) == pytest.approx(2.0 - 0.1 + 0.002)


def test_a_refusal_is_charged_as_a_request_whatever_the_refused_one_would_cost():
    b, clock = budget(share=0.5, burst_s=2.0)
    b.admit("a", 3.0)  # due at 6 s
    for _ in range(100):  # 1 ms each, at a half share: 0.2 s later
        with pytest.raises(OverBudget):
            b.admit("a", 1.0)
    clock.now += 4.0
    assert b.admit("a", 0.001) == pytest.approx(0.2)


def test_waiting_requests_per_client_are_capped_and_freed():
    b, _ = budget(share=1.0, burst_s=2.0)
    b.admit("a", 2.5)
    waits = [b.admit("a", 0.01) for _ in range(MAX_WAITING)]
    assert all(w > 0 for w in waits)
    with pytest.raises(OverBudget, match="already waiting"):
        b.admit("a", 0.01)
    b.waited("a")
    assert b.admit("a", 0.01) > 0


def test_charges_after_the_start_are_paid_by_the_next_requests():
    b, clock = budget(share=0.5, burst_s=2.0)
    assert b.admit("a", 0.001) == 0.0
    b.charge("a", 1.5)  # the body turned out to cost 1.5 s to parse: 3 s of budget
    assert b.admit("a", 0.001) == pytest.approx(1.002)
    b.waited("a")


def test_share_zero_admits_everything():
    b, _ = budget(share=0.0)
    assert all(b.admit("a", 100.0) == 0.0 for _ in range(100))
    b.charge("a", 100.0)
    assert b.admit("a", 100.0) == 0.0


def test_idle_clients_are_forgotten():
    b, clock = budget()
    for i in range(3000):
        b.admit(f"10.0.{i // 256}.{i % 256}", 0.001)
    clock.now += 10.0  # all full again: forgotten once the table has doubled
    for i in range(1100):
        b.admit(f"10.1.{i // 256}.{i % 256}", 0.001)
    assert len(b._clients) <= 1100


@pytest.mark.parametrize("address, client", [
    ("127.0.0.1", "127.0.0.1"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
    (None, ""),
    ("unix:/tmp/x", "unix:/tmp/x"),
])
def test_a_client_is_an_address_or_an_ipv6_host_s_64(address, client):
    assert client_of(address) == client


@pytest.mark.parametrize("peer, forwarded, client", [
    ("10.9.0.5", "198.51.100.1", "198.51.100.1"),  # a trusted proxy's client
    ("10.9.0.5", "1.1.1.1, 198.51.100.1", "198.51.100.1"),  # what came before, the client wrote
    ("10.9.0.5", "198.51.100.1, 10.9.0.7", "198.51.100.1"),  # through two trusted proxies
    ("10.9.0.5", "not-an-address", "10.9.0.5"),
    ("10.9.0.5", None, "10.9.0.5"),
    ("192.0.2.9", "198.51.100.1", "192.0.2.9"),  # anyone else's header is not believed
])
def test_a_trusted_proxy_names_its_client(peer, forwarded, client):
    names = ClientNames(ClientLimits(trusted_proxies="10.9.0.0/16, 2001:db8::1"))
    assert names.of(peer, forwarded) == client


def test_limits_are_checked():
    with pytest.raises(ValueError):
        ClientLimits(share=-1)
    with pytest.raises(ValueError):
        ClientLimits(burst_s=0)
    with pytest.raises(ValueError):
        ClientLimits(max_connections=0)
    with pytest.raises(ValueError, match="trusted_proxies"):
        ClientLimits(trusted_proxies="10.0.0.0/8, proxy.example")


def test_connections_past_a_client_s_cap_are_refused_later_then_reset():
    connections = ConnectionsByClient(2, ClientNames(ClientLimits(trusted_proxies="10.9.0.0/16")))
    peer = ("10.0.0.1", 5000)
    verdicts = [connections.opened(peer) for _ in range(5)]
    assert [v[1] is None for v in verdicts] == [True, True, False, False, False]
    assert [v[0] for v in verdicts] == ["10.0.0.1"] * 4 + [None]  # the reset is not counted
    assert verdicts[2][1] is not verdicts[4][1]  # answered late, or reset at once
    assert connections.opened(("10.0.0.2", 1))[1] is None  # another client
    for client, _ in verdicts[:4]:
        connections.closed(client)
    assert connections.opened(peer)[1] is None
    proxy = ("10.9.1.1", 1)  # its connections are its clients': never capped
    assert all(connections.opened(proxy) == (None, None) for _ in range(10))


def test_a_grpc_refusal_never_says_retry_now():
    """A wait of a fraction of a millisecond is pushed back 1 ms, not 0 ("retry now")."""
    from router.service import _refuse_over_budget

    class Context:
        def set_trailing_metadata(self, metadata):
            self.metadata = metadata

        def abort(self, code, details):
            raise RuntimeError(code)

    context = Context()
    with pytest.raises(RuntimeError):
        _refuse_over_budget(context, OverBudget("over its share", 0.0004))
    assert context.metadata == [("grpc-retry-pushback-ms", "1")]
