"""Entry point: ``torchrun --nproc_per_node=N train/main.py [options]`` or ``python train/main.py``.

With no options it trains the ``cpu-small`` preset (a small DeepLabV3+ with U-CE on
street-scene-like synthetic images generated on the fly) on the CPU in a few minutes and prints
mIoU, the calibration and uncertainty metrics and the per-class IoU. See ``--help``; for CE vs
U-CE over several seeds see ``python -m train.compare``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
