"""What several nodes share: cluster-wide rates and connection limits, the suppression
list and destination suspensions, kept in Redis (see docs and deploy/README.md).

Each node keeps its own queue and mailbox store; only limits and lists are shared. When
Redis is away, a node works on its local share of every limit and its local copy of the
lists, and catches up when Redis returns: delivery never waits for Redis.
"""
