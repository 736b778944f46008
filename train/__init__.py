"""Reference training harness for ``uce_fast``: DeepLabV3+ with MC dropout trained with CE or U-CE.

Run ``torchrun --nproc_per_node=N train/main.py`` (or ``python train/main.py``); see
``train/main.py --help``. This package uses ``uce_fast``; ``uce_fast`` never imports it.
"""
