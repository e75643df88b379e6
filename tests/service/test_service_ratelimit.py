"""featureviz.ratelimit: the failed sign-in throttle shared by the gRPC interceptor and the web gateway."""

from __future__ import annotations

import pytest

from featureviz.ratelimit import FailureThrottle
from featureviz.ratelimit import client_address


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_blocks_after_the_limit_and_frees_after_a_minute():
    clock = Clock()
    throttle = FailureThrottle(3, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("a") == 0
        throttle.failed("a")
        clock.now += 1
    assert throttle.retry_after("a") == pytest.approx(57)
    assert throttle.retry_after("b") == 0  # another address is not affected
    clock.now += 57
    assert throttle.retry_after("a") == 0
    assert len(throttle) == 1  # the expired failures of "a" are gone; "b" never failed


def test_memory_is_bounded_by_the_oldest_idle_address():
    clock = Clock()
    throttle = FailureThrottle(1, max_clients=100, clock=clock)
    for i in range(1000):
        throttle.failed(f"addr-{i}")
    assert len(throttle) == 100
    assert throttle.retry_after("addr-999") > 0 and throttle.retry_after("addr-0") == 0


def test_client_address_drops_the_port():
    assert client_address("ipv4:10.1.2.3:5555") == "ipv4:10.1.2.3"
    assert client_address("ipv6:[::1]:40000") == "ipv6:[::1]"
    assert client_address("unix:/tmp/x.sock") == "unix:/tmp/x.sock"
