import logging
import sys

from library.dataset.debug import main

# the summary repeats every warning, so the log shows only errors here
logging.basicConfig(level=logging.ERROR, format="%(message)s")
sys.exit(main())
