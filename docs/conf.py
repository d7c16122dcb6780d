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
myst_heading_anchors = 3
# Notebooks are executed by the test suite against a small checkpoint; the docs render them as
# stored so a docs build needs no model weights.
nb_execution_mode = "off"
# ".rst" first: autosummary writes its stub pages with the first reStructuredText suffix; with
# ".md" first they would be parsed as Markdown and their directives shown as plain text.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
# generated/*.md: stubs left by builds made before the ".rst" fix (duplicate documents otherwise).
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    "generated/*.md",
]
templates_path = ["_templates"]
# No intersphinx: CI has no network, and unreachable inventories are warnings (errors under -W).

html_theme = "sphinx_book_theme"
html_title = "scdlkit"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/scdlkit/scdlkit",
    "use_repository_button": True,
}


# --------------------------------------------------------------------------------------------
# Docstrings of re-exported module constants.
#
# autodoc reads a constant's ``#:`` comment from the module it is documented under, but
# ``scdlkit.foundation.OFFICIAL_CHECKPOINTS`` is defined (and commented) in a private submodule,
# and a constant without a comment would show the docstring of its type ("Built-in immutable
# sequence..."). This looks the comment up where the object is defined, with a fallback text.

_CONSTANT_FALLBACKS = {
    "scdlkit.foundation.STRATEGIES": [
        "Every adaptation strategy name accepted by ``strategies=`` of "
        ":func:`scdlkit.tl.adapt_annotation` and :class:`scdlkit.AnnotationRunner`; see "
        ":doc:`/strategies` for what each one trains.",
    ],
}


def _defining_comment(modname: str, name: str, obj: object) -> list[str] | None:
    import importlib
    import pkgutil

    from sphinx.pycode import ModuleAnalyzer

    package = importlib.import_module(modname)
    for info in pkgutil.iter_modules(getattr(package, "__path__", []), modname + "."):
        module = importlib.import_module(info.name)
        if getattr(module, name, None) is not obj:
            continue
        docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
        comment = docs.get(("", name))
        if comment:
            return [line for line in comment if line is not None]
    return None


def _constant_docstring(app, what, name, obj, options, lines):
    # A constant has no docstring of its own: what autodoc found is its type's (a tuple's, a
    # dict's), so it is always replaced.
    if what != "data" or not name.startswith("scdlkit."):
        return
    modname, _, attr = name.rpartition(".")
    found = _defining_comment(modname, attr, obj) or _CONSTANT_FALLBACKS.get(name)
    lines[:] = [*found, ""] if found else []


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docstring)
