"""JMAP (RFC 8620 core, RFC 8621 mail) on the mailbox store, served by the ``http``
listener (``routes``), and the webmail page's static files (``webmail``)."""
