"""``python -m agt_mesh`` runs the ``agt-mesh`` command line."""

import sys

from agt_mesh.cli.main import main

sys.exit(main())
