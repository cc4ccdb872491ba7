"""The ``labhooks`` command line."""
