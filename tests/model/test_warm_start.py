"""Start points: from scratch, an init checkpoint, the model in production."""

from __future__ import annotations

import json

import numpy as np
import pytest

from odapi_operators.core.model import warm_start
from odapi_operators.core.model.warm_start import StartPointError

from conftest import (SAMPLE_MODEL, TRAINED_LOOP, TRAINED_STEPS, odapi, prepare_records,
                      tiny_model_config)


def test_both_start_points_at_once_are_refused():
    with pytest.raises(StartPointError, match="not both"):
        warm_start.resolve("/ckpt", "/serving/shapes")


def test_warm_start_without_a_production_model_starts_from_scratch(tmp_path, capsys):
    start = warm_start.resolve(None, str(tmp_path / "serving" / "shapes"))
    assert start["checkpoint"] is None and "nothing in production" in start["reason"]
    assert "from scratch" in capsys.readouterr().err


def test_missing_init_checkpoint_names_the_path(tmp_path):
    with pytest.raises(StartPointError, match="no such checkpoint"):
        warm_start.checkpoint_prefix(str(tmp_path / "nope" / "ckpt-5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StartPointError, match="no checkpoint in this folder"):
        warm_start.checkpoint_prefix(str(tmp_path / "empty"))


@pytest.mark.slow
def test_warm_start_begins_at_a_lower_loss_than_scratch(trained_model, tmp_path):
    """Done-when of issue 5: starting from a trained model measurably lowers the first loss.
    The base is the session's model (60 steps in 10-step loops: its first loop is a fresh
    start's); the warm run trains one 10-step loop on the same records and config."""
    base_dir = trained_model["model_dir"]
    base = json.loads((base_dir / "summary.json").read_text())
    warm = json.loads(odapi(
        "train", "--model-config", str(trained_model["config"]), "--data",
        str(trained_model["records"]), "--out", str(tmp_path / "warm"), "--steps",
        str(TRAINED_LOOP), "--batch-size", "4", "--init-checkpoint", str(base_dir),
        "--warm-start-lr-factor", "0.25",  # the tiny model's SGD peak, 0.08, is for a scratch start
    ).stdout.splitlines()[-1])
    assert warm["start"]["modules"] == "all"
    assert warm["start"]["from"].endswith(f"ckpt-{TRAINED_STEPS}")
    assert base["start"] == {"checkpoint": None, "reason": "from scratch", "from": "scratch",
                             "learning_rate": {"schedule": "cosine", "peak": 0.08,
                                               "warmup_steps": 100, "fine_tune_factor": None}}
    assert warm["start"]["learning_rate"]["fine_tune_factor"] == 0.25
    (first_step, scratch_loss), (_, warm_loss) = base["losses"][0], warm["losses"][0]
    assert (first_step, warm["losses"][0][0]) == (TRAINED_LOOP, TRAINED_LOOP)  # one loop each
    (_, trained_loss) = base["losses"][-1]
    print(f"first loop: scratch {scratch_loss:.3f}, warm {warm_loss:.3f}; "
          f"base after {TRAINED_STEPS} steps {trained_loss:.3f}")
    # It picks up where the base run ended (60 steps, still in the LR warmup: its loss fell
    # from ~1.8 to ~1.6 here), clearly below a fresh start.
    assert warm_loss < scratch_loss - 0.1
    assert abs(warm_loss - trained_loss) < abs(warm_loss - scratch_loss)
    # (A retry of a warm-started run resumes from its own checkpoint, not the start point:
    # test_train_resume.py.)


@pytest.mark.slow
def test_a_new_class_keeps_the_whole_model_and_trains_on(trained_model, tmp_path):
    """Continuous training after an export adds a class: the production model (3 classes)
    is restored whole into the 4-class model, its classes found by name (the new label map
    sorts diamond second, so square and triangle move up an id); training runs (before, a
    whole-model restore created the head in the old shape and failed at its first step)."""
    assert warm_start.source_classes(
        warm_start.checkpoint_prefix(str(trained_model["model_dir"]))) == 4  # 3 + background
    records = prepare_records(tmp_path, count=12, seed=8,
                              classes=("circle", "square", "triangle", "diamond"))
    warm = json.loads(odapi(
        "train", "--model-config", str(trained_model["config"]), "--data", str(records),
        "--out", str(tmp_path / "warm"), "--steps", "2", "--batch-size", "2",
        "--init-checkpoint", str(trained_model["model_dir"]),
    ).stdout.splitlines()[-1])
    assert warm["start"]["modules"] == "backbone,decoder,head"  # all of it, head remapped
    assert warm["start"]["classes"] == {"kept": ["circle", "square", "triangle"],
                                        "new": ["diamond"], "dropped": []}
    assert warm["start"]["learning_rate"]["warmup_steps"] == 0
    assert warm["steps"] == 2
    assert "num_classes: 5" in (tmp_path / "warm" / "params.yaml").read_text()


def test_class_channels_move_by_anchor_and_class():
    """Channel a * classes + c is anchor a's class c (TF-Vision reshapes to [..., classes])."""
    source = np.arange(2 * 3, dtype=np.float32)  # 2 anchors x (background + 2 classes)
    target = np.full(2 * 4, -9.0, dtype=np.float32)
    sources = warm_start.class_transfer.class_sources({"a": 1, "b": 2}, {"b": 1, "c": 2, "a": 3},
                                                      4)
    assert sources == [0, 2, None, 1]
    assert warm_start.class_transfer.map_class_channels(
        source, target, sources, 3).tolist() == [0, 2, -9, 1, 3, 5, -9, 4]


def _model(folder, num_classes: int, seed: int):
    """A RetinaNet of the tiny test config (untrained, random weights) with its task."""
    import tensorflow as tf
    import yaml
    from official.core import exp_factory, task_factory

    from odapi_operators.core.model import tfvision

    tfvision.setup_tensorflow()
    params = exp_factory.get_exp_config("retinanet_mobile_coco")
    params.override(yaml.safe_load(tiny_model_config(folder).read_text())["params"],
                    is_strict=True)
    params.task.model.num_classes = num_classes
    tf.keras.utils.set_random_seed(seed)
    task = task_factory.get_task(params.task)
    return params, task, task.build_model()


def _logits(model, images) -> tuple[np.ndarray, np.ndarray]:
    """Class logits [images, anchors, classes] and box outputs, all levels, as TF-Vision's
    loss and detection generator reshape them."""
    import tensorflow as tf

    features = model.backbone(images, training=False)
    if model.decoder is not None:
        features = model.decoder(features, training=False)
    scores, boxes, _ = model.head(features, training=False)
    classes = model.head.get_config()["num_classes"]
    return (tf.concat([tf.reshape(scores[k], [len(images), -1, classes]) for k in scores],
                      1).numpy(),
            tf.concat([tf.reshape(boxes[k], [len(images), -1]) for k in boxes], 1).numpy())


@pytest.mark.parametrize("layout", ["trainer", "saved_model"])
def test_new_classes_keep_old_scores_and_start_new_ones_at_the_prior(tmp_path, layout):
    """A 3-class model (with a non-trivial classifier) restored into a 4-class one whose label
    map numbers classes differently: every old class (and background) scores exactly as
    before on the same images, boxes too, and the new class starts at the prior p = 0.01.
    From a train model dir, and from a SavedModel's variables (the model under `model/`, its
    label map and params in assets.extra/)."""
    import tensorflow as tf
    from official.core import train_utils

    from odapi_operators.core.data.label_map import format_label_map

    old_map = {"circle": 1, "square": 2, "triangle": 3}
    new_map = {"square": 1, "diamond": 2, "circle": 3, "triangle": 4}
    params, task, old = _model(tmp_path, 4, seed=1)
    strategy = tf.distribute.get_strategy()
    warm_start._builder(task, strategy)(old)
    rng = np.random.default_rng(0)
    for variable in old.head._classifier.weights:  # distinct logits per class
        variable.assign(rng.normal(0, 0.05, variable.shape).astype(np.float32))
    if layout == "trainer":
        folder = tmp_path / "model"
        prefix = folder / "ckpt-7"
        checkpoint = tf.train.Checkpoint(**old.checkpoint_items)
    else:
        folder = tmp_path / "serving" / "1" / "assets.extra"
        prefix = tmp_path / "serving" / "1" / "variables" / "variables"
        checkpoint = tf.train.Checkpoint(model=old)
    folder.mkdir(parents=True)
    checkpoint.write(str(prefix))
    train_utils.serialize_config(params, str(folder))
    (folder / "label_map.pbtxt").write_text(format_label_map(old_map))

    _, new_task, new = _model(tmp_path, 5, seed=2)
    info = warm_start.install(new_task, str(prefix), new_map, strategy)
    new_task.initialize(new)
    assert info["modules"] == "backbone,decoder,head"
    assert info["classes"] == {"kept": ["square", "circle", "triangle"], "new": ["diamond"],
                               "dropped": []}

    images = tf.constant(rng.uniform(-1, 1, (2, *params.task.model.input_size)), tf.float32)
    (old_logits, old_boxes), (new_logits, new_boxes) = _logits(old, images), _logits(new, images)
    np.testing.assert_allclose(new_boxes, old_boxes, atol=1e-5)
    np.testing.assert_allclose(new_logits[..., 0], old_logits[..., 0], atol=1e-5)  # background
    for name, old_id in old_map.items():
        np.testing.assert_allclose(new_logits[..., new_map[name]], old_logits[..., old_id],
                                   atol=1e-5, err_msg=name)
    assert np.abs(old_logits[..., 1] - old_logits[..., 2]).max() > 0.1  # classes differ
    prior = -np.log((1 - 0.01) / 0.01)
    np.testing.assert_allclose(new_logits[..., new_map["diamond"]], prior, atol=0.05)


def test_a_fine_tune_drops_the_warmup_and_scales_the_peak(tmp_path):
    """A start from a trained detector: the sample config's 0.002 peak x 0.25, no warm-up,
    cosine over the run's 150 steps (TF-Vision's own schedule builder reads it back)."""
    from official.modeling.optimization import optimizer_factory

    from odapi_operators.core.model import tfvision

    tfvision.setup_tensorflow()
    (tmp_path / "summary.json").write_text(json.dumps({
        "num_classes": 3, "label_map": str(tmp_path / "label_map.pbtxt"),
        "splits": {split: {"pattern": str(tmp_path / f"{split}-*")}
                   for split in ("train", "val")}}))
    params = tfvision.build_params(SAMPLE_MODEL, tmp_path, 150, 8)
    schedule = optimizer_factory.OptimizerFactory(params.trainer.optimizer_config)
    assert float(schedule.build_learning_rate()(0)) == pytest.approx(0.0001)  # its warm-up
    tfvision.fine_tune(params, 0.25)
    rate = optimizer_factory.OptimizerFactory(params.trainer.optimizer_config) \
        .build_learning_rate()
    assert float(rate(0)) == pytest.approx(0.0005)
    assert float(rate(75)) == pytest.approx(0.00025, rel=1e-3)
    assert float(rate(150)) == pytest.approx(0.0, abs=1e-6)
    assert tfvision.learning_rate_record(params, 0.25) == {
        "schedule": "cosine", "peak": pytest.approx(0.0005), "warmup_steps": 0,
        "fine_tune_factor": 0.25}
