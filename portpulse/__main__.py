"""``python -m portpulse``: the same command line as the ``portpulse`` script."""

import sys

from portpulse.app.cli import main

sys.exit(main())
