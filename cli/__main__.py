"""``python -m cli``: the ``lwq`` command."""

import sys

from cli.main import main

sys.exit(main())
