import sys

from serving.server.cli import main

sys.exit(main())
