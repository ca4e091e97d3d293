"""The ``edged`` command line: one module per command group."""
