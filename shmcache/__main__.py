"""``python -m shmcache`` is the ``shmcache`` command."""

import sys

from .cli import main

sys.exit(main())
