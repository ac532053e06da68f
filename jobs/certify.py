"""Run the certification job: ``python jobs/certify.py [--config configs/demo.yaml] [--output DIR] [--set k=v]``.

The same script runs locally (starts a private Ray instance) and unchanged under
``ray job submit --working-dir . -- python jobs/certify.py ...`` (attaches to the cluster via RAY_ADDRESS).
With no arguments it runs the embedded demo.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working_dir under `ray job submit`

from ray_certseg.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    debug = ["--debug"] if "--debug" in args else []  # ray-certseg's global flag, accepted here too
    sys.exit(main([*debug, "run", *(a for a in args if a != "--debug")]))
