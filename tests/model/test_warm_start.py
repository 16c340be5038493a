"""Start points: from scratch, an init checkpoint, the model in production."""

from __future__ import annotations

import json

import pytest

from odapi_operators.core.model import warm_start
from odapi_operators.core.model.warm_start import StartPointError

from conftest import TRAINED_LOOP, TRAINED_STEPS, odapi, prepare_records


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
    ).stdout.splitlines()[-1])
    assert warm["start"]["modules"] == "all"
    assert warm["start"]["from"].endswith(f"ckpt-{TRAINED_STEPS}")
    assert base["start"] == {"checkpoint": None, "reason": "from scratch", "from": "scratch"}
    (first_step, scratch_loss), (_, warm_loss) = base["losses"][0], warm["losses"][0]
    assert (first_step, warm["losses"][0][0]) == (TRAINED_LOOP, TRAINED_LOOP)  # one loop each
    (_, trained_loss) = base["losses"][-1]
    print(f"first loop: scratch {scratch_loss:.3f}, warm {warm_loss:.3f}; "
          f"base after {TRAINED_STEPS} steps {trained_loss:.3f}")
    # It picks up where the base run ended (60 steps, still in the LR warmup: its loss fell
    # from ~2.1 to ~1.9 here), clearly below a fresh start.
    assert warm_loss < scratch_loss - 0.1
    assert abs(warm_loss - trained_loss) < abs(warm_loss - scratch_loss)
    # (A retry of a warm-started run resumes from its own checkpoint, not the start point:
    # test_train_resume.py.)


@pytest.mark.slow
def test_a_new_class_keeps_backbone_and_decoder_and_trains_a_new_head(trained_model, tmp_path):
    """Continuous training after an export adds a class: the production head (3 classes) must
    not be restored into a 4-class model. TF would create the unbuilt head from the checkpoint
    in the old shape and training would fail at its first step (a reshape of the class
    outputs); before, only a head whose shape mismatched at restore time was caught."""
    assert warm_start.source_classes(
        warm_start.checkpoint_prefix(str(trained_model["model_dir"]))) == 4  # 3 + background
    records = prepare_records(tmp_path, count=12, seed=8,
                              classes=("circle", "square", "triangle", "diamond"))
    warm = json.loads(odapi(
        "train", "--model-config", str(trained_model["config"]), "--data", str(records),
        "--out", str(tmp_path / "warm"), "--steps", "2", "--batch-size", "2",
        "--init-checkpoint", str(trained_model["model_dir"]),
    ).stdout.splitlines()[-1])
    assert warm["start"]["modules"] == "backbone"  # this model has no decoder
    assert warm["steps"] == 2
    assert "num_classes: 5" in (tmp_path / "warm" / "params.yaml").read_text()
