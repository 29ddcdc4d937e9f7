"""The ``lwq`` command line (outside the pure library, which it drives)."""
