"""The SMTP client and next-hop routing: how a message reaches the next hop (MX lookup,
smarthost, ``[[route]]`` entries, persistent pipelined connections with STARTTLS and AUTH).

Shared by outbound delivery (``tachymail.delivery``) and by intake's recipient verification
(``tachymail.smtp.verify``), so that intake imports nothing from the delivery package.
"""
