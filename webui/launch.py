"""Start the web UI from a checkout: ``python webui/launch.py [--base tiny] [--adapters DIR] ...``.

A thin launcher only: the app itself is the ``stylelora.webui`` package (installed with stylelora), and this
does exactly what ``stylelora webui`` does with the same flags.
"""

import sys

from stylelora.cli import main

if __name__ == "__main__":
    sys.exit(main(["webui", *sys.argv[1:]]))
