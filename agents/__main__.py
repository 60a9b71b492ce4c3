"""``python -m agents`` runs the agent daemon (see agents.daemon)."""

import sys

from agents.daemon import main

sys.exit(main())
