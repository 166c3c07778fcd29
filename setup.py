"""Packaging beyond pyproject.toml: one start-up file, so plain mlx_lm.load finds nanochat 2026 models.

mlx-lm has no plugin registry; mlx_grpo-mlx_lm.pth, installed beside the packages in site-packages, installs
a finder for mlx_lm.models.nanochat_2026 at interpreter start-up (utils/nanochat/mlx_lm_hook.py). It is
written by build_py, so `pip install .` and `pip install -e .` both ship it (and uninstall removes it).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = "mlx_grpo-mlx_lm.pth"  # sorts after setuptools' __editable__ .pth, which makes mlx_grpo importable
PTH_LINE = "import mlx_grpo.nanochat.mlx_lm_hook; mlx_grpo.nanochat.mlx_lm_hook.install()\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        # A regular wheel is packed from build_lib; an editable one from the install folder (setuptools >= 64).
        folder = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, PTH_FILE).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_FILE))]


setup(cmdclass={"build_py": BuildPyWithPth})
