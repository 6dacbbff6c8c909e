"""The SMTP session's states: the plain class the hot paths read holds exactly the enum's
members (a state added to one and not the other would be a session stuck in it)."""

from __future__ import annotations

from tachymail.smtp.session import SessionState, State


def test_the_plain_states_are_the_enum_members() -> None:
    plain = {name: value for name, value in vars(State).items() if name.isupper()}
    assert plain == dict(SessionState.__members__)
    assert all(type(value) is SessionState for value in plain.values())


def test_reading_a_plain_state_does_not_go_through_the_enum_hook() -> None:
    # type's own attribute lookup: no __getattr__ anywhere in the metaclass's MRO
    assert not any("__getattr__" in vars(kind) for kind in type(State).__mro__)
