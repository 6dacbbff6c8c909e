"""The inbound SMTP server: listeners, the per-connection protocol state machine, workers.

Arrives with the inbound-SMTP issue; it drives ``tachymail.protocol``'s readers.
"""
