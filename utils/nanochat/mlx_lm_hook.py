"""Lets plain mlx_lm.load read nanochat 2026 folders (model_type "nanochat_2026", utils/nanochat/model.py).

mlx-lm imports a config's model_type as the module mlx_lm.models.<model_type> and has no plugin registry
(its other hook, config.json's "model_file", needs trust_remote_code=True from every caller). So a
meta-path finder answers for our model types with a module holding this package's classes.

install() runs at interpreter start-up from the file mlx_grpo-mlx_lm.pth, which `pip install .` and
`pip install -e .` put into site-packages (setup.py). It imports nothing: the model module (and mlx-lm)
load only when mlx-lm asks for the model type. utils' own loader passes the classes to mlx-lm directly
(utils/nanochat/folder.py) and works without it.
"""

import importlib
import importlib.util
import sys

MODEL_TYPE = "nanochat_2026"
_MODULES = {f"mlx_lm.models.{MODEL_TYPE}": "mlx_grpo.nanochat.model"}


class _ModelTypeFinder:
    """Finder and loader of mlx_lm.models.<our model type>: the same classes as our module, under mlx-lm's name."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in _MODULES else None

    def create_module(self, spec):
        return None  # the default module

    def exec_module(self, module):
        source = importlib.import_module(_MODULES[module.__name__])
        module.__dict__.update({k: v for k, v in vars(source).items() if not k.startswith("__")})


def install() -> None:
    """Put the finder first on sys.meta_path (once)."""
    if not any(isinstance(finder, _ModelTypeFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ModelTypeFinder())
