"""Convert a nanochat checkpoint into an MLX folder: the command line of mlx_grpo.nanochat.convert.

    python convert_nanochat.py --help
"""

import sys

from mlx_grpo.nanochat.convert import main

if __name__ == "__main__":
    sys.exit(main())
