"""Client authentication (SMTP AUTH against scrypt hashes); later SPF, DKIM and DMARC.

Arrives with the inbound-SMTP issue.
"""
