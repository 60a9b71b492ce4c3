"""rbdfleet data plane: the agent that runs on every VM of a fleet.

Standard library only (the librbd backend aside); never imports ``orchestrator``.
"""
