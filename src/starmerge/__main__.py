import sys

from starmerge.cli import main

sys.exit(main())
