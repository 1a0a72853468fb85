"""setuptools' build backend, minus one notice that cannot be acted on.

An editable install of a project whose folders map to sub-packages
(``[tool.setuptools.package-dir]``: ``compiler`` -> ``kiln.compiler``) always uses a
meta path finder, and setuptools then emits ``InformationOnly("Editable installation.")``
as a warning on every ``pip install -e .``. It is information, not a problem of this
project, so it is filtered here; every other setuptools warning still shows.
"""

from __future__ import annotations

import warnings

from setuptools.build_meta import *  # noqa: F403  (the PEP 517/660 hooks, unchanged)
from setuptools.warnings import InformationOnly

warnings.filterwarnings("ignore", category=InformationOnly)
