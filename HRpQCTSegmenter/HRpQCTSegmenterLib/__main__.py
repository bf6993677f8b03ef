"""``python -m HRpQCTSegmenterLib`` is the same as the ``hrpqct`` command."""

import sys

from .cli import main

sys.exit(main())
