"""The stream world: documents streamed through the focus loop a step at a time (DESIGN §3).

``synthetic`` is the exact synthetic world (its documents, references and NLL oracle); ``world``
holds the episode that streams a document (synthetic, or real text through the frozen LM), the
policy evaluation ``sim.run`` reports and the NLL-gap-recovered measure. What sits on it:
``sim.labels`` (labelled traces), ``sim.calibrate``, ``sim.policies``, ``sim.run`` and ``envs``.
"""
