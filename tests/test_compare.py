"""moe-tune compare: spec validation, aggregation by hand, and resuming an interrupted run."""

import json

import pytest

from moe_tune.cli import main
from moe_tune.compare import aggregate, check_spec, load_spec

from conftest import ROOT

QUICK = {"sft.max_steps": 2, "sft.eval_steps": 2, "sft.logging_steps": 1, "eval.max_rows": 6,
         "eval.compare_base": False, "eval.retention_file": None, "data.max_train_rows": 64}


def write_spec(tmp_path, **fields):
    spec = {"base": str(ROOT / "recipes" / "quickstart.yaml"), "output_dir": str(tmp_path / "out"),
            "seeds": [1], "overrides": QUICK, "variants": {"full": {"trainable.preset": "full"}}, **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.mark.parametrize("fields, expected", [
    ({"variant": {}}, r"unknown key 'variant'; did you mean 'variants'"),
    ({"seeds": []}, r"seeds: List should have at least 1 item"),
    ({"variants": {}}, r"variants: Dictionary should have at least 1 item"),
])
def test_spec_errors(tmp_path, capsys, fields, expected):
    assert main(["compare", str(write_spec(tmp_path, **fields))]) == 2
    err = capsys.readouterr().err
    assert "spec.yaml" in err and len(err.strip().splitlines()) == 1
    import re

    assert re.search(expected, err), err


def test_a_bad_variant_is_named_before_anything_runs(tmp_path):
    from moe_tune.errors import MoeTuneError

    spec = load_spec(write_spec(tmp_path, variants={"ok": {}, "typo": {"trainable.prest": "full"}}))
    with pytest.raises(MoeTuneError, match=r"variant 'typo': .*unknown key 'trainable.prest'.*'preset'"):
        check_spec(spec)
    assert not (tmp_path / "out").exists()


def test_aggregate_by_hand():
    runs = {"a": [{"heldout_exact_match": 0.5, "wall_s": 10}, {"heldout_exact_match": 0.7, "wall_s": 14},
                  {"heldout_exact_match": 0.6, "wall_s": 12}],
            "b": [{"heldout_exact_match": 0.2, "wall_s": 5}]}
    table = aggregate(runs)
    mean, std = table["a"]["heldout_exact_match"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)  # sample std of .5 .7 .6
    assert table["a"]["wall_s"] == pytest.approx((12.0, 2.0))
    assert table["b"]["heldout_exact_match"] == (0.2, 0.0)


@pytest.mark.slow
def test_interrupted_comparison_resumes(tmp_path, capsys):
    assert main(["compare", str(write_spec(tmp_path, seeds=[1]))]) == 0
    first = tmp_path / "out" / "full" / "seed-1" / "compare_run.json"
    stamp = first.stat().st_mtime
    capsys.readouterr()
    # the same spec with a second seed: seed 1 is not run again
    assert main(["compare", str(write_spec(tmp_path, seeds=[1, 2]))]) == 0
    out = capsys.readouterr().out
    assert "full seed 1: finished before, skipped" in out and "full seed 2: training" in out
    assert first.stat().st_mtime == stamp
    rows = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    assert rows[1].startswith("full,2,")
    assert "± " in (tmp_path / "out" / "comparison.md").read_text()
    for plot in ("score_vs_trainable", "loss_curves"):
        assert (tmp_path / "out" / f"{plot}.png").stat().st_size > 0


def test_a_group_the_eval_file_lacks_is_refused_before_anything_runs(tmp_path):
    from moe_tune.errors import MoeTuneError

    spec = load_spec(write_spec(tmp_path, group="new_phrasings"))
    with pytest.raises(MoeTuneError, match=r"group: no row of variant 'full''s first eval file .*heldout.jsonl"):
        check_spec(spec)
    check_spec(load_spec(write_spec(tmp_path, group="new_phrasing")))
    assert not (tmp_path / "out").exists()


def test_the_scored_group_is_the_specs_and_the_whole_file_by_default(tmp_path):
    from moe_tune.compare import measure

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (run / "plan.json").write_text(json.dumps({"trainable_params": 10}))
    scores = lambda em, loss: {"exact_match": em, "loss": loss}  # noqa: E731
    tuned = {"overall": scores(0.5, 1.0), "per_group": {"new_phrasing": scores(0.8, 0.3),
                                                        "unseen_task": scores(0.0, 5.0)}}
    (run / "eval" / "report.json").write_text(json.dumps(
        {"heldout.jsonl": {"results": {"tuned": tuned}, "routing": {}}}))
    assert measure(run, 1.0, 0.1)["heldout_exact_match"] == 0.5
    by_group = measure(run, 1.0, 0.1, "new_phrasing")
    assert by_group["heldout_exact_match"] == 0.8 and by_group["heldout_loss"] == 0.3
