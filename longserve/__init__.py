"""longserve: long-context LLM inference with sparse attention backends.

The subpackages live in the repository's root folders (server/, engine/, kernels/, policies/, bench/) and
are mapped under this one namespace by pyproject.toml, so they never clash with PyPI packages of the same
short names.
"""

__version__ = "0.1.0"
