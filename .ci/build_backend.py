"""setuptools' build backend, with its notice about this project's layout silenced for editable installs.

``passes/``, ``plugins/``, ``export/`` and ``benchmarks/`` live at the top level and install as
``dsmoe.passes`` … (the design card; ``[tool.setuptools.package-dir]`` in pyproject.toml). For such
a mapping an editable install needs setuptools' import-hook finder, and setuptools then prints an
``InformationOnly`` notice ("Please be careful with folders in your working directory with the same
name as your package …") on every ``pip install -e`` — which pip shows even with ``-q``. The layout
is deliberate and the notice asks nothing of the user, so this wrapper drops that one notice and
nothing else: every other warning, and every wheel and sdist build, is setuptools' own.
"""

from __future__ import annotations

import warnings

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 / 660 hooks, as setuptools defines them)

try:
    from setuptools.warnings import InformationOnly
except ImportError:  # an older setuptools: nothing to silence
    InformationOnly = None


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with warnings.catch_warnings():
        if InformationOnly is not None:
            warnings.filterwarnings("ignore", message=r"Editable installation", category=InformationOnly)
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
