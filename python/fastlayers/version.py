# SPDX-License-Identifier: Apache-2.0
"""The version comes from the installed metadata (pyproject.toml is its one source)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastlayers")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
