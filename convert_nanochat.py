"""Convert a nanochat checkpoint into an MLX folder: the command line of mlx_grpo.nanochat.convert.

    python convert_nanochat.py --help
"""

import sys

try:
    from mlx_grpo.nanochat.convert import main
except ModuleNotFoundError as missing:  # run from a checkout that was never installed
    if missing.name != "mlx_grpo":
        raise
    sys.exit("error: the package mlx_grpo is not installed in this Python: run pip install -e . in the checkout")

if __name__ == "__main__":
    sys.exit(main())
