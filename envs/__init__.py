"""Gymnasium adapters of the simulation: ``MegaFocus-v0`` (see ``envs.megafocus_env.MegaFocusEnv``).

Importing this package registers the environment, so ``gymnasium.make("MegaFocus-v0")`` works after
``import envs``; without that import, ``gymnasium.make("envs:MegaFocus-v0")`` imports it for you.
"""

from gymnasium.envs.registration import register, registry


def register_envs() -> None:
    """Register MegaFocus-v0 (idempotent; also the ``gymnasium.envs`` entry point)."""
    if "MegaFocus-v0" not in registry:
        register(id="MegaFocus-v0", entry_point="envs.megafocus_env:MegaFocusEnv", max_episode_steps=1000)


register_envs()
