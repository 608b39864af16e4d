"""Sphinx configuration of the causalir book: the executed notebooks (never executed here), the claims table.

Built by ``make book`` (see docs/stage.py): ``sphinx-build -W -n -c docs artifacts/book-src artifacts/book``.
"""
import importlib.util

project = "causalir"
author = "the causalir authors"
copyright = "the causalir authors, Apache-2.0"
extensions = ["myst_nb"]

# The notebooks come executed from artifacts/notebooks/ (papermill, `causalir reproduce --notebooks`).
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

nitpicky = True  # with -W: a broken cross-reference fails the build
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

if importlib.util.find_spec("sphinx_book_theme"):
    html_theme = "sphinx_book_theme"
    html_theme_options = {"show_toc_level": 2, "home_page_in_toc": True}
else:  # the built-in theme: the book still builds
    html_theme = "alabaster"
html_title = "causalir"
