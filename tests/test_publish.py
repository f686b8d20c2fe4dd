"""Champion/challenger publishing: versioned copies, the atomic `current` pointer, and the decision rule."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tasks.publish import (
    CURRENT,
    PUBLISH_FILE,
    PublishError,
    decide,
    new_version,
    publish,
    read_current,
    set_current,
)


def make_run(root: Path, name: str, sumr: float) -> Path:
    run = root / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"optimizer state")
    (run / "model.pt").write_bytes(name.encode())
    (run / "metrics.json").write_text(json.dumps({"split": "test", "sumr": sumr}))
    (run / "report.md").write_text(f"# run {name}\n")
    return run


def metrics(sumr: float, split: str = "test") -> dict:
    return {"split": split, "sumr": sumr, "r1": sumr / 4}


def test_decide_promotes_first_model_ties_and_better_ones_only():
    assert decide(100.0, None, "test") == (True, "no current model yet")
    assert decide(250.0, 250.0, "test")[0] is True
    assert decide(251.0, 250.0, "test")[0] is True
    promoted, reason = decide(249.5, 250.0, "test")
    assert promoted is False
    assert "249.50 < current model's 250.00" in reason and "'test'" in reason


def test_first_publish_becomes_current_without_the_checkpoint(tmp_path):
    run = make_run(tmp_path, "a", 300.0)
    models = tmp_path / "models"
    decision = publish(run, models, "v1", metrics(300.0), None)
    assert decision.promoted and decision.current == "v1"
    assert read_current(models) == "v1"
    assert (models / CURRENT).read_text() == "v1\n"
    assert (models / "v1" / "model.pt").read_bytes() == b"a"
    assert not (models / "v1" / "checkpoints").exists()
    assert json.loads((models / "v1" / PUBLISH_FILE).read_text())["promoted"] is True
    assert "v1 is now the current model" in (models / "v1" / "report.md").read_text()


def test_worse_challenger_is_kept_as_candidate_and_current_stays(tmp_path):
    models = tmp_path / "models"
    publish(make_run(tmp_path, "a", 300.0), models, "v1", metrics(300.0), None)
    champion = {"version": "v1", **metrics(310.0)}  # the champion re-evaluated on today's split
    decision = publish(make_run(tmp_path, "b", 305.0), models, "v2", metrics(305.0), champion)
    assert not decision.promoted
    assert decision.current == "v1" and decision.champion_sumr == 310.0
    assert read_current(models) == "v1"
    assert (models / "v2" / "model.pt").read_bytes() == b"b"  # published as a candidate all the same
    report = (models / "v2" / "report.md").read_text()
    assert (
        "v2 was kept as a candidate; v1 stays current" in report
        and "305.00 < current model's 310.00" in report
    )


def test_better_challenger_moves_current(tmp_path):
    models = tmp_path / "models"
    publish(make_run(tmp_path, "a", 300.0), models, "v1", metrics(300.0), None)
    decision = publish(
        make_run(tmp_path, "b", 320.0), models, "v2", metrics(320.0), {"version": "v1", **metrics(300.0)}
    )
    assert decision.promoted and read_current(models) == "v2"


def test_versions_are_never_overwritten(tmp_path):
    models = tmp_path / "models"
    publish(make_run(tmp_path, "a", 300.0), models, "v1", metrics(300.0), None)
    with pytest.raises(PublishError, match="never overwritten"):
        publish(make_run(tmp_path, "b", 400.0), models, "v1", metrics(400.0), None)
    assert (models / "v1" / "model.pt").read_bytes() == b"a"


def test_current_pointer_must_name_an_existing_version(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    assert read_current(models) is None
    with pytest.raises(PublishError, match="does not exist"):
        set_current(models, "ghost")
    (models / CURRENT).write_text("ghost\n")
    with pytest.raises(PublishError, match="not in"):
        read_current(models)


def test_versions_sort_by_time_and_carry_the_run_id():
    early = new_version("0a38502d-1111-2222", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    late = new_version("ffff0000-1111-2222", dt.datetime(2026, 1, 2, 3, 4, 6, tzinfo=dt.UTC))
    assert early == "20260102-030405-0a38502d"
    assert early < late
