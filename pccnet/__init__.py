"""PCCNet model library: pure torch. No sockets, no processes, no file IO beyond reading weight files."""

__version__ = "0.1.0"
