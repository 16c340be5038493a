"""Process-wide TensorFlow settings that an ExperimentConfig's `runtime` section asks for.

TF-Vision applies `runtime.mixed_precision_dtype` in its command-line driver
(`official/vision/train.py`), not in `train_lib.run_experiment`, so a stage that calls
run_experiment itself must set the policy before the task builds the model. The loss scale needs
nothing here: `Task.create_optimizer` wraps the optimizer in a LossScaleOptimizer (from
`runtime.loss_scale`, dynamic if unset) whenever the dtype is `float16`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from odapi_operators.core.model.tfvision import ModelConfigError

if TYPE_CHECKING:
    from official.core.config_definitions import ExperimentConfig

MIXED_PRECISION_DTYPES = ("float16", "bfloat16")


def apply_runtime(params: ExperimentConfig) -> None:
    """Set the global Keras mixed precision policy from `params.runtime.mixed_precision_dtype`.

    float32 or unset leaves the policy alone. Call it in the train stage before the task builds
    the model. Evaluate and export can leave it out: the weights are float32 under either policy
    (a mixed_float16 checkpoint restores into a float32 model unchanged), and a float32
    evaluation scores exactly the model that export serves, also on a CPU-only worker.
    """
    dtype = params.runtime.mixed_precision_dtype
    if dtype in (None, "float32"):
        return
    if dtype not in MIXED_PRECISION_DTYPES:
        raise ModelConfigError(
            f"runtime.mixed_precision_dtype: {dtype!r} is not one of float32, "
            f"{', '.join(MIXED_PRECISION_DTYPES)} (TF-Vision's names: Keras' 'mixed_float16' "
            "is written float16)")
    from official.modeling import performance

    performance.set_mixed_precision_policy(dtype)
