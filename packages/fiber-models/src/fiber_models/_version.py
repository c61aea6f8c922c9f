"""The version of fiber-models: written once, in its pyproject.toml, and read here from the installed metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fiber-models")
except PackageNotFoundError:  # pragma: no cover - a bare source checkout has no metadata
    __version__ = "0+unknown"
