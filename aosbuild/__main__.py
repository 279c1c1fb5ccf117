"""`python -m aosbuild`."""

from .entry import script

script()
