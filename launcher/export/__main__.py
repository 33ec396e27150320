"""`python -m launcher.export run_dir=DIR ...`; see launcher/export/cli.py."""

import sys

from launcher.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
