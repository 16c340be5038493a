"""Every stage of the pipeline by name: the one list runners, the CLI and operators read.

Declarations live with their concern (`data/stages.py`, `model/stages.py`, ...); importing
them loads pydantic models only, never TensorFlow, NumPy or PIL.
"""

from __future__ import annotations

from functools import cache

from odapi_operators.core.stages.contract import StageSpec


@cache
def stages() -> dict[str, StageSpec]:
    from odapi_operators.core.data import stages as data
    from odapi_operators.core.evaluation import stages as evaluation
    from odapi_operators.core.labeling import stages as labeling
    from odapi_operators.core.model import stages as model
    from odapi_operators.core.serving import stages as serving

    declared = [*data.STAGES, *model.STAGES, *evaluation.STAGES, *serving.STAGES,
                *labeling.STAGES]
    by_name = {spec.name: spec for spec in declared}
    assert len(by_name) == len(declared), "two stages share a name"
    return by_name


def get(name: str) -> StageSpec:
    try:
        return stages()[name]
    except KeyError:
        raise ValueError(f"no stage {name!r} (stages: {', '.join(stages())})") from None
