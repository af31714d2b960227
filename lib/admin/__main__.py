"""``python -m lib.admin hash-password``: prints a hash for ``--admin-password-hash``."""
import sys

from lib.admin.app import main

sys.exit(main(sys.argv[1:]))
