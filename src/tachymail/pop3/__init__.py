"""The POP3 front end (RFC 1939 with RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 AUTH): listener
roles ``pop3`` (plain, STLS offered) and ``pop3s`` (implicit TLS), served by the SMTP worker
processes on the same event loop. ``commands`` is the wire format without I/O, ``session``
the connection's state machine; mail is read and deleted only through ``tachymail.mailbox``.
"""
