"""Prometheus metrics from every process, served by the supervisor.

Arrives with the observability issue.
"""
