"""`python -m aosbuild`."""

import sys

from .entry import main

sys.exit(main())
