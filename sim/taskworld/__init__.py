"""The task world: long-context tasks (``sim.tasks``) streamed through the MegaContext tree on the
real LM to question time, zoomed by a policy and scored (DESIGN §9, §11).

``world`` streams a task and runs the question-time zoom; ``keystore`` holds what a read of the
stream leaves (post-RoPE keys, the question's queries) and the attention features LensNet reads;
``features`` the per-block features the baselines read and the cheap label's relevance;
``scoring`` answers a task after a policy's zoom. What sits on it: ``sim.policies``,
``sim.calibrate`` and the task entry points (``sim.evaluate``, ``sim.tasklabels``,
``sim.tasktrain``, ``sim.taskstudy``).
"""
