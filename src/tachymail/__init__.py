"""Tachymail: a fast, durable mail transfer agent.

The path of a message through the package:
``protocol`` (pure parsing, compiled hot path) → ``smtp`` (the inbound server)
→ ``queue`` (durable LMDB store) → ``delivery`` (outbound pools, with ``dns``
for routing) ; ``auth`` checks clients, ``metrics`` makes it visible, ``cli``
is the ``tachymail`` command.
"""

__version__ = "0.1.0"
