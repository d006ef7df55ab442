import sys

from cheapspot_worker.main import main

sys.exit(main())
