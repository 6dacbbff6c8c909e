"""SMTP and MIME parsing with no I/O: the compiled hot path and its pure-Python twins.

``commands`` (command lines, paths and ESMTP parameters), ``data`` (DATA and
BDAT bodies, outbound dot-stuffing) and ``mime`` (MIME part scanner) each pick
the compiled extension built from ``ext/`` or, with ``TACHYMAIL_PURE=1`` or
when the extension is missing, the ``*_py`` twin of the same API.
"""
