"""``python -m attrib`` (and ``torchrun -m attrib``): the command line, as the ``attrib`` console script."""
from .cli import main

raise SystemExit(main())
