"""Gymnasium adapters of the simulation: ``MegaFocus-v0`` (see ``envs.megafocus_env.MegaFocusEnv``).

Importing this package registers the environment. An installed megafocus imports it as soon as
``gymnasium`` is imported (``megafocus_gym_hook.py``, loaded by ``megafocus-gym.pth``), so
``gymnasium.make("MegaFocus-v0")`` needs no ``import envs``; ``gymnasium.make("envs:MegaFocus-v0")``
works regardless.
"""

from gymnasium.envs.registration import register, registry


def register_envs() -> None:
    """Register MegaFocus-v0 (idempotent; also the ``gymnasium.envs`` entry point)."""
    if "MegaFocus-v0" not in registry:
        register(
            id="MegaFocus-v0", entry_point="envs.megafocus_env:MegaFocusEnv", max_episode_steps=1000
        )


register_envs()
