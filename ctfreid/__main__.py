import sys

from ctfreid.cli import main

sys.exit(main())
