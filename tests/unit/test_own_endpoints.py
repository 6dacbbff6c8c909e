"""Which next hops are this server itself (delivery-side mail-loop detection)."""

from __future__ import annotations

from tachymail.config import from_dict
from tachymail.smtpclient.routing import OwnEndpoints


def own(*listeners: str, hostname: str = "mail.example.org") -> OwnEndpoints:
    config = from_dict(
        {
            "server": {"hostname": hostname},
            "listener": [{"address": a, "role": "mx"} for a in listeners],
        }
    )
    return OwnEndpoints(config)


def test_exactly_the_host_and_port_of_a_listener() -> None:
    me = own("127.0.0.1:2525", "[::1]:2526")
    assert me.is_own("127.0.0.1", 2525)
    assert me.is_own("::1", 2526) and me.is_own("[::1]", 2526)
    assert me.is_own("::ffff:127.0.0.1", 2525)  # IPv4-mapped is the same address
    assert not me.is_own("127.0.0.1", 2526)  # another server's port on our address
    assert not me.is_own("127.0.0.2", 2525)  # another address: not bound by us
    assert not me.is_own("mail.example.org", 2525)  # names are not addresses


def test_a_wildcard_listener_owns_its_port_on_local_addresses_only() -> None:
    me = own("0.0.0.0:2525")
    assert me.is_own("127.0.0.1", 2525) and me.is_own("127.0.0.9", 2525)
    assert not me.is_own("192.0.2.1", 2525)  # TEST-NET: never one of ours
    assert not me.is_own("127.0.0.1", 25)
    assert not me.is_own("::1", 2525)  # an IPv4 wildcard does not listen on IPv6
    both = own("[::]:2525")
    assert both.is_own("::1", 2525) and both.is_own("127.0.0.1", 2525)


def test_our_hostname_on_a_port_we_listen_on() -> None:
    me = own("127.0.0.1:25", hostname="Mail.Example.org")
    assert me.is_own_name("mail.example.org", 25)
    assert me.is_own_name("MAIL.EXAMPLE.ORG.", 25)
    assert not me.is_own_name("mail.example.org", 2525)
    assert not me.is_own_name("other.example.org", 25)
