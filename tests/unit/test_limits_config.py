"""The connection-hardening settings of [limits] (issue 16): defaults and validation."""

from __future__ import annotations

import pytest

from tachymail.config import ConfigError, from_dict, load


def test_hardening_defaults() -> None:
    limits = load(None).limits
    assert limits.command_deadline == 60.0
    assert limits.data_deadline == 600.0
    assert limits.min_data_rate == 500
    assert limits.stress_command_timeout == 10.0
    assert limits.reserved == 200  # a tenth of the 2000 default connections


@pytest.mark.parametrize(("setting", "reserved"), [(-1, 10), (0, 0), (99, 99)])
def test_reserved_connections(setting: int, reserved: int) -> None:
    limits = from_dict({"limits": {"max_connections": 100, "reserved_connections": setting}}).limits
    assert limits.reserved == reserved


@pytest.mark.parametrize("setting", [-2, 100, 5000])
def test_reserved_connections_must_leave_untrusted_clients_a_slot(setting: int) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"limits": {"max_connections": 100, "reserved_connections": setting}})
    assert "limits.reserved_connections" in str(caught.value)


@pytest.mark.parametrize(
    "name",
    [
        "command_deadline",
        "data_deadline",
        "min_data_rate",
        "data_rate_grace",
        "stress_command_timeout",
    ],
)
def test_hardening_limits_must_not_be_negative(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"limits": {name: -1}})
    assert f"limits.{name}: must not be negative" in str(caught.value)
