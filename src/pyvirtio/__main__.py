import sys

from pyvirtio.cli.main import main

sys.exit(main())
