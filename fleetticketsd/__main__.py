import sys

from fleetticketsd.cli import main

sys.exit(main())
