"""Only here to ship ``megafocus-gym.pth`` (see ``megafocus_gym_hook.py``); metadata lives in
pyproject.

A ``.pth`` must sit at the top of site-packages, which setuptools has no declarative option for:
``build_py`` copies it into regular wheels, ``editable_wheel`` into editable ones.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).resolve().parent / "megafocus-gym.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(
        self, installation_dir, pth_prefix
    ):  # writes into the unpacked wheel root
        super()._install_namespaces(installation_dir, pth_prefix)
        self.copy_file(str(PTH), str(Path(installation_dir) / PTH.name))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
