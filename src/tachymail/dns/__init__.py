"""Next-hop resolution (MX, implicit MX, null MX) with dnspython, cached by TTL.

Arrives with the outbound-delivery issue.
"""
