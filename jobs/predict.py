"""Batch scoring: label a local or s3:// file, folder or glob of files into a folder of Parquet
files (--model ... --input ... --output ...), read, labelled and written by Ray Data across the
cluster.

Entrypoint for `ray job submit` (the exact line opens each YAML under jobs/configs/), or
run it as it is: `python jobs/predict.py --config jobs/configs/<job>.yaml --model ... --input ... --output ...`.
Joins the cluster named by RAY_ADDRESS (set by `ray job submit`), or starts a local Ray
when none is set: the embedded default.
"""

import os
import sys

# This checkout's raybm (the submitted version) before any installed one; and no module of
# jobs/ (data, train, tune ...) shadowing a library's module of the same name.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from raybm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
