"""`python -m kvmesh.cli` is the `kvmesh` command."""

import sys

from kvmesh.cli.main import main

sys.exit(main())
