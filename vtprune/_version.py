"""The package version, in a foundation module so tools (results.json) read it without importing the facade."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version
