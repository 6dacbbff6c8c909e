"""Next-hop resolution (MX, implicit MX, null MX) with dnspython, cached by TTL.

Arrives with the outbound-delivery issue; the record lookups (:meth:`Resolver.txt`, ``a``,
``aaaa``, ``mx_records``, ``ptr``, each a :class:`Records`) serve the inbound checks of
``tachymail.mailauth`` (SPF, DKIM keys, DMARC, DNSBL, iprev) through the same cache and the
same DNS server.

The delivery engine asks :meth:`Resolver.mx` where a domain's mail goes and
:meth:`Resolver.addresses` what to connect to. The rules (RFC 5321 §5.1, RFC 7505):

- The MX records, sorted by preference. Hosts of equal preference come in a new random
  order on every call, cached or not, so load spreads over them. A host listed twice keeps
  its lowest preference.
- No MX records, but the domain has A or AAAA records: the domain is its own mail host
  (implicit MX), ``MxHost(domain, -1)``.
- A null MX (RFC 7505: one MX, preference 0, target ".") means the domain accepts no mail.
  A "." target mixed with real hosts is a mistake and is ignored.
- Address literals (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) never reach the DNS.
- Names: U-labels are converted to A-labels (IDNA), everything is lower-case, and host names
  carry no final dot.

Each :class:`Resolution` has a ``status``; what the delivery engine does with it:

============= =================================================================== =========
status        meaning                                                             engine
============= =================================================================== =========
``ok``        ``hosts`` (never empty) are the hosts to try, in order              delivers
``null_mx``   the domain publishes a null MX: it accepts no mail                  556 5.1.10
``nxdomain``  the domain does not exist (NXDOMAIN), or the name cannot exist:     550 5.1.2
              not a valid domain name or address literal
``no_host``   the domain exists but has neither MX nor A/AAAA records             550 5.1.2
``temporary`` the DNS could not answer: SERVFAIL, REFUSED, timeout, network error 451 4.4.3
============= =================================================================== =========

``detail`` says why in words for every status but ``ok``. :meth:`Resolver.addresses`
returns a list (empty when the host has no address or does not exist) and raises
:class:`TemporaryDnsError` instead of the ``temporary`` status.

Caching, per :class:`Resolver` and bounded in size (least recently used evicted first):
answers live for their TTL, clamped to 5 s .. 1 h; negative answers (``nxdomain``,
``no_host``) for the SOA's negative TTL (RFC 2308), or 60 s when the answer carries no SOA;
temporary failures for 5 s, so a failing server is not hammered. Concurrent lookups of the
same name share one query. The looked-up addresses of an implicit MX are cached too, so the
``addresses()`` call that follows costs nothing.
"""

from tachymail.dns.resolver import MxHost, Records, Resolution, Resolver, TemporaryDnsError

__all__ = ["MxHost", "Records", "Resolution", "Resolver", "TemporaryDnsError"]
