#!/usr/bin/env python
"""The `hf-modelopt` command line as a script, for `accelerate launch scripts/run_recipe.py run RECIPE ...`.

A bare recipe path is taken as `run RECIPE`: `accelerate launch scripts/run_recipe.py RECIPE --output-dir DIR`.
"""

import sys

from hf_modelopt.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] not in ("run", "eval", "inspect", "-h", "--help"):
        argv = ["run", *argv]
    sys.exit(main(argv))
