"""`python -m qlora_ext.train`: the same as the `qlora-train` console script."""
import sys

from .cli import main

sys.exit(main())
