"""AUTH failure accounting (auth.throttle), sender ownership (auth.users) and their settings.

The throttle runs on a real LMDB environment in a temporary directory; only the clock is
the test's, so decay and lockout expiry need no sleeping.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tachymail.auth.throttle import AuthThrottle, address_key
from tachymail.auth.users import SenderOwnership
from tachymail.config import ConfigError, from_dict


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def throttle(tmp_path: Path, clock: Clock, per_ip: int = 5, per_user: int = 3) -> AuthThrottle:
    return AuthThrottle(
        tmp_path / "auth-failures",
        max_per_ip=per_ip,
        max_per_user=per_user,
        lockout=60.0,
        half_life=100.0,
        clock=clock,
    )


def test_failures_decay_by_half_life(tmp_path: Path) -> None:
    clock = Clock()
    guard = throttle(tmp_path, clock, per_ip=0, per_user=0)
    assert [guard.failed("192.0.2.1", f"u{n}").count for n in range(2)] == [1.0, 2.0]
    clock.now += 100.0  # one half-life: 2 -> 1, plus this failure
    assert guard.failed("192.0.2.1", "u9").count == pytest.approx(2.0)
    assert guard.locked("192.0.2.1", "u9") is None  # limits of 0 never lock
    guard.close()


def test_address_lockout_refuses_unchecked_and_ends(tmp_path: Path) -> None:
    clock = Clock()
    guard = throttle(tmp_path, clock, per_ip=3, per_user=0)
    checks: list[str] = []

    def wrong() -> bool:
        checks.append("wrong")
        return False

    verdicts = [guard.attempt("192.0.2.1", f"user{n}", wrong) for n in range(3)]
    assert [v.failure.began if v.failure else None for v in verdicts] == [(), (), ("ip",)]
    locked = guard.attempt("192.0.2.1", "alice", lambda: checks.append("right") is None)
    assert not locked.ok and locked.lockout is not None
    assert (locked.lockout.scope, locked.lockout.until) == ("ip", clock.now + 60.0)
    assert checks == ["wrong"] * 3  # the right password was never checked
    assert guard.attempt("192.0.2.2", "alice", lambda: True).ok  # another address
    clock.now += 60.0
    assert guard.attempt("192.0.2.1", "alice", lambda: True).ok
    # The count began again at the lockout: three more failures to the next one.
    assert guard.failed("192.0.2.1", "x").count == pytest.approx(1.0, abs=0.01)
    guard.close()


def test_attempts_during_a_lockout_do_not_extend_it(tmp_path: Path) -> None:
    clock = Clock()
    guard = throttle(tmp_path, clock, per_ip=0, per_user=2)
    for source in ("192.0.2.1", "192.0.2.2"):
        guard.failed(source, "alice")
    lockout = guard.locked("198.51.100.7", "alice")
    assert lockout is not None and lockout.scope == "user"
    for _ in range(10):
        clock.now += 5.0
        assert guard.attempt("192.0.2.3", "alice", lambda: False).lockout == lockout
    clock.now = lockout.until
    assert guard.locked("192.0.2.3", "alice") is None


def test_success_takes_back_only_its_own_addresss_failures(tmp_path: Path) -> None:
    clock = Clock()
    guard = throttle(tmp_path, clock, per_ip=0, per_user=3)
    guard.failed("192.0.2.1", "alice")  # someone else guessing
    guard.failed("192.0.2.2", "alice")  # alice mistyping
    guard.succeeded("192.0.2.2", "alice")
    # One failure left (the guesser's): two more make three.
    assert guard.failed("192.0.2.1", "alice").began == ()
    assert guard.failed("192.0.2.1", "alice").began == ("user",)


def test_ipv6_is_counted_per_64(tmp_path: Path) -> None:
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == b"2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.1") == address_key("192.0.2.1") == b"192.0.2.1"
    clock = Clock()
    guard = throttle(tmp_path, clock, per_ip=2, per_user=0)
    guard.failed("2001:db8::1", "a")
    assert guard.failed("2001:db8::2", "b").began == ("ip",)
    assert guard.locked("2001:db8::abcd", "c") is not None
    assert guard.locked("2001:db8:1::1", "c") is None


def test_long_names_and_sweeping(tmp_path: Path) -> None:
    clock = Clock()
    guard = throttle(tmp_path, clock, per_ip=0, per_user=1)
    guard.failed("192.0.2.1", "x" * 12000)  # a 12 KB name: hashed into a fixed-size key
    assert guard.locked("192.0.2.9", "x" * 12000) is not None
    guard.failed("192.0.2.1", "bob")  # also locked (per_user=1)
    clock.now += 61.0  # lockouts over; counts were reset to 0 when they began
    guard.failed("192.0.2.2", "carol")  # locks carol until now + 60
    clock.now += 1000.0
    assert guard.locked("192.0.2.2", "carol") is None
    removed = guard.sweep()
    assert removed > 0
    with guard.env.begin() as txn:
        assert txn.stat()["entries"] == 0
    guard.close()


def test_sender_ownership() -> None:
    owners = SenderOwnership(
        {"bob": ["Bob@Example.org", "@example.net"], "ops": ["@EXAMPLE.COM"]}, null_sender=False
    )
    assert owners.owns("alice@example.com", "Alice@EXAMPLE.com")
    assert not owners.owns("alice@example.com", "bob@example.com")
    assert not owners.owns("alice", "alice@example.com")  # a bare login owns nothing by itself
    assert owners.owns("bob", "bob@example.org") and owners.owns("bob", "x@Example.NET")
    assert not owners.owns("bob", "x@sub.example.net") and not owners.owns("bob", "example.net")
    assert owners.owns("ops", "anyone@example.com")
    assert not owners.owns("bob", "")
    assert SenderOwnership({}, null_sender=True).owns("anyone", "")


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        ({"sender_login": ["relay"]}, "auth.sender_login[0]: must be one of"),
        ({"senders": {"bob": ["bob"]}}, "auth.senders.bob: 'bob' is neither"),
        ({"senders": {"bob": ["@"]}}, "auth.senders.bob: '@' is neither"),
        ({"failure_half_life": 0}, "auth.failure_half_life: must be more than 0"),
        ({"max_failures_per_ip": -1}, "auth.max_failures_per_ip: must be at least 0"),
        ({"lockout": -1}, "auth.lockout: must not be negative"),
        ({"failure_delay": 5, "max_failure_delay": 1}, "auth.max_failure_delay: must not be"),
    ],
)
def test_auth_settings_are_validated(auth: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_dict({"auth": auth})
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


def test_auth_defaults() -> None:
    auth = from_dict({}).auth
    assert (auth.max_failures_per_ip, auth.max_failures_per_user) == (20, 10)
    assert (auth.lockout, auth.failure_half_life, auth.max_failure_delay) == (900, 900, 15)
    assert auth.sender_login == ["submission", "smtps"] and auth.null_sender


def test_local_delivery_domains_follow_routing() -> None:
    config = from_dict(
        {
            "policy": {"local_domains": ["Local.example", "moved.example"]},
            "route": [
                {"domain": "moved.example", "host": "10.0.0.1:25"},
                {"domain": "Routed.example", "host": "local"},
            ],
        }
    )
    assert config.local_delivery_domains == {"local.example", "routed.example"}
