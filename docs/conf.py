"""Sphinx configuration for the scdlkit documentation."""

from __future__ import annotations

import scdlkit

project = "scdlkit"
author = "scdlkit developers"
copyright = "2026, scdlkit developers"
release = scdlkit.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "numpydoc",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks: set[str] = set()
myst_enable_extensions = ["colon_fence", "deflist"]
# Notebooks are executed by the test suite against a small checkpoint; the docs render them as
# stored so a docs build needs no model weights.
nb_execution_mode = "off"
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
# No intersphinx: CI has no network, and unreachable inventories are warnings (errors under -W).

html_theme = "sphinx_book_theme"
html_title = "scdlkit"
html_static_path = ["_static"]
html_theme_options = {"repository_url": "https://github.com/scdlkit/scdlkit", "use_repository_button": True}
