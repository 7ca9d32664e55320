"""Sphinx configuration of ipcserve's documentation site, built from docs/ (Markdown).

    pip install -e '.[docs]'
    python -m sphinx -W --keep-going -b html docs docs/_build/html

Why Sphinx (with MyST for Markdown) rather than MkDocs: the references are generated from
the code, and Sphinx's autodoc renders the Google-style docstrings the code already has
(napoleon), while its configuration lives here, inside docs/, beside the pages (MkDocs wants
its ``mkdocs.yml`` outside the folder it builds). With ``-W`` every warning fails the build:
a link to a page or a heading anchor that does not exist, a page in no table of contents, a
docstring autodoc cannot read. tests/test_docs_site.py runs that build.
"""

from __future__ import annotations

import ipcserve

project = "ipcserve"
author = "the ipcserve authors"
copyright = "2026, the ipcserve authors"
release = version = ipcserve.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# GitHub's heading anchors, so `page.md#a-heading` links work the same on GitHub and here,
# and a missing one is a warning (an error, with -W).
myst_heading_anchors = 6
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass fields: documented once, by their Attributes section

html_theme = "furo"
html_title = f"ipcserve {release}"
