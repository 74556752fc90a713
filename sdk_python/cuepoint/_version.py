"""The SDK version, read from the installed distribution so pyproject is the one source."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cuepoint-sdk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

SDK_AGENT = f"cuepoint-python/{__version__}"
"""What Hello.sdk_version carries."""
