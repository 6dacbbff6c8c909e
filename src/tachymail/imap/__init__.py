"""The IMAP front end (RFC 9051 IMAP4rev2 and RFC 3501 IMAP4rev1) on the mailbox store.

``session`` is the protocol on the worker's event loop; ``fetch`` renders FETCH data items
from the stored summary and octets; ``search`` evaluates SEARCH, SORT and THREAD.
"""
