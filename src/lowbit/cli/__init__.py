"""Layer 7: the ``lowbit`` command line, a thin shell over the public API."""
