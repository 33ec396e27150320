"""`python -m launcher.reference`: print the override reference (generated in launcher/config/reference.py)."""

import sys

from launcher.config.reference import override_reference

if __name__ == "__main__":
    print(override_reference())
    sys.exit(0)
