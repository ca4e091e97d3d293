"""edged: an edge-inference daemon for ARM64 boards and NVIDIA Jetson devices."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edged")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
