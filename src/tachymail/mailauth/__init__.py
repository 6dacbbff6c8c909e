"""Message authentication: DKIM signing (outbound) and, on the mx listener, the inbound
checks: SPF, DKIM verification, DMARC, ARC, iprev, DNSBL/DNSWL and the
Authentication-Results header. Used by intake and delivery alike; knows nothing of sockets.
Every DNS lookup goes through the shared async resolver (``tachymail.dns``).
"""
