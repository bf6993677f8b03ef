"""``python -m HRpQCTPipeline`` is the same as the ``hrpqct`` command."""

import sys

from HRpQCTPipeline.cli import main

sys.exit(main())
