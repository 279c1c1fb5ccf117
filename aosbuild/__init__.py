"""aosbuild: build operating-system images from osbuild manifests with one async engine.

The engine is this package; what stages and runners import inside the sandbox is its subpackage
`aosbuild.sandboxside`, the only part of it a sandbox sees (there, as the package `aosbuild`).
"""

__version__ = "0.1.0"
OSBUILD_VERSION = "191"  # the osbuild release whose behaviour aosbuild follows (both commands' --version)
