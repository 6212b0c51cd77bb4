import sys

from fastvl.cli import main

sys.exit(main())
