"""Candidates timed in a process of their own: a family whose candidate patches its process (an inference engine
such as vLLM sets the process's torch threads) says so (``Recipe.time_apart``), and the shared pipeline builds that
candidate in an ``ApartTimer`` actor pinned to the driver's node, then times it in turn with the models in the driver.

The actor reserves no CPU: the side-by-side rounds call ``time`` one model at a time, so no two timings overlap.
"""

from __future__ import annotations

import warnings
from typing import Any

import ray


@ray.remote(num_cpus=0)
class ApartTimer:
    """One candidate, built by its family's ``Recipe.build`` in this actor and timed by ``Recipe.time`` on request."""

    def __init__(self, family: str, config_json: str, key: str, settings: dict[str, Any], student: Any, data: Any):
        from slimray import families

        warnings.filterwarnings("ignore")
        fam = families.get(family)
        self.recipe = fam.load("recipe")()
        self.cfg = fam.load("config").model_validate_json(config_json)
        self.key, self.settings, self.data = key, settings, data
        self.model = self.recipe.build(settings, student, data)

    def time(self) -> Any:
        """This candidate's figures for one round (``Recipe.time``'s answer for it)."""
        return self.recipe.time({self.key: self.model}, self.data, cfg=self.cfg, settings={self.key: self.settings})[self.key]


def start_apart_timer(*, family: str, config_json: str, key: str, settings: dict[str, Any], student: Any, data_ref: Any):
    """An ``ApartTimer`` on this node (the timings compare models on one machine), once its candidate is built."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ApartTimer.options(scheduling_strategy=here).remote(family, config_json, key, settings, student, data_ref)
    ray.get(actor.__ray_ready__.remote())
    return actor
