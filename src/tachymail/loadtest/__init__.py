"""Load tools for benchmarking mail systems: ``tachymail bench`` and ``tachymail sink``.

``generator`` is the SMTP load generator (many pipelined sessions per process,
optionally several processes), ``sink`` a receive-only SMTP server with reply
mixes, added latency and counters, ``options`` the command-line syntax both
share (sizes, address templates, reply mixes), ``messages`` the message bodies
and ``stats`` the merged counters and latency histogram. docs/load-testing.md
is the user's guide.
"""
