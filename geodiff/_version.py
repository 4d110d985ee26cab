"""Single source of the package version (read by ``geodiff.__version__`` and the CLI)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geodiff")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
