"""``python -m transfuse`` = the ``transfuse`` command."""

import sys

from .cli import main

sys.exit(main())
