"""``python -m agt_mesh.dev``: run the development relay and registry (see :func:`main`)."""

import sys

from agt_mesh.dev.server import main

sys.exit(main())
