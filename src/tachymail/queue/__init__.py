"""The durable LMDB queue: envelopes and content, group commit before "250 OK".

Arrives with the inbound-SMTP issue.
"""
