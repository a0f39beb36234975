"""Registers ``MegaFocus-v0`` whenever gymnasium is imported, so ``gymnasium.make("MegaFocus-v0")``
works after install with no ``import envs``.

Gymnasium 1.x dropped entry-point plugin loading, so the installed ``megafocus-gym.pth`` imports
this small module at interpreter start-up. It imports nothing heavy itself: it adds a finder that
wraps gymnasium's loader and, once ``gymnasium`` has executed, imports ``envs`` (which only calls
``gymnasium.register``; the environment module loads on ``make``). Set ``MEGAFOCUS_NO_GYM_HOOK=1``
to switch it off.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys


class _RegisterAfterLoad:  # a loader (duck-typed: importlib.abc costs ~20 ms at start-up)
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # get_data, is_package, resource readers...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        try:
            import envs  # noqa: F401  (registers MegaFocus-v0)
        except Exception as err:  # never break ``import gymnasium`` for other programs
            print(f"megafocus: could not register MegaFocus-v0: {err!r}", file=sys.stderr)


class _GymnasiumFinder:  # a meta path finder
    def find_spec(self, name, path, target=None):
        if name != "gymnasium":
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec with the other finders
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    if os.environ.get("MEGAFOCUS_NO_GYM_HOOK") or "gymnasium" in sys.modules:
        return
    if not any(isinstance(f, _GymnasiumFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _GymnasiumFinder())


install()
