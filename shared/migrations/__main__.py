"""``python -m shared.migrations revision "what changed"``: write the next revision (see the package)."""

import sys

from shared.migrations import new_revision

if len(sys.argv) != 3 or sys.argv[1] != "revision":
    sys.exit('usage: python -m shared.migrations revision "what changed"')
new_revision(sys.argv[2])
