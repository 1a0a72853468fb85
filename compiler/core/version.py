"""kiln's version, as recorded in exported ONNX (producer_version), manifests and reports."""

from __future__ import annotations

from importlib import metadata

#: When kiln runs from a source tree that was never installed (no package metadata):
#: a PEP 440 version that sorts before every release.
UNKNOWN_VERSION = "0+unknown"


def kiln_version() -> str:
    """The installed ``kiln`` distribution's version, or :data:`UNKNOWN_VERSION`."""
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION
