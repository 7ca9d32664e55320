"""A complete ipcserve server: ``python app.py`` serves the built-in digits model.

Flags (``python app.py --help``): --host (default 127.0.0.1), --port (8000), --threads,
--model (digits or package.module:attribute), --api-key, --timeout, --workers, ...
Every flag also reads an IPCSERVE_* environment variable.
"""

import sys

from ipcserve.server.cli import main

if __name__ == "__main__":  # required: the spawn start method re-imports this file
    sys.exit(main(["serve", *sys.argv[1:]]))
