"""aosbuild: build operating-system images from osbuild manifests with one async engine.

This file stays free of third-party imports: the package is bind-mounted into every stage sandbox,
where `aosbuild.stageapi` runs on the build root's own python3 with only the standard library.
"""

__version__ = "0.1.0"
OSBUILD_VERSION = "191"  # the osbuild release whose behaviour aosbuild follows (both commands' --version)
