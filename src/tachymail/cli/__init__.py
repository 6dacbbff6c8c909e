"""The ``tachymail`` command line."""
