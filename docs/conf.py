"""Sphinx configuration of linattn's documentation (bash scripts/docs.sh builds it)."""
project = "linattn"
author = "linattn developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
html_theme = "alabaster"
# The guides link to files of the repository outside docs/ (examples, scripts).
suppress_warnings = ["myst.xref_missing"]
