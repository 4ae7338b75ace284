"""``python -m jaxrl.plan ...`` runs the ``jaxrl plan`` command."""

import sys

from jaxrl.plan.command import main

if __name__ == "__main__":
    sys.exit(main())
