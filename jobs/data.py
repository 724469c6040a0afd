"""Data stage entrypoint for `ray job submit` (or plain `python jobs/data.py`).

    python jobs/data.py --config jobs/configs/demo.yaml [key=value ...]

Joins the cluster named by RAY_ADDRESS, or starts a local Ray when none is set.
"""

import sys

from raybm.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
