import sys

from varprune.cli import main

sys.exit(main())
