"""Outbound delivery: scheduler, per-destination pools of persistent connections, bounces.

Arrives with the outbound-delivery issue.
"""
