"""The ``pyvirtio`` command line."""
