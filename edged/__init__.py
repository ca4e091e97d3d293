"""edged: an edge-inference daemon for ARM64 boards and NVIDIA Jetson devices."""

# The one place the version is written (pyproject reads it); no importlib.metadata lookup at
# start-up, which costs tens of milliseconds on a small board.
__version__ = "0.1.0"

__all__ = ["__version__"]
