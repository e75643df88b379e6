import sys

from featureviz.cli import main

sys.exit(main())
