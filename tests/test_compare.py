"""moe-tune compare: spec validation, aggregation by hand, and resuming an interrupted run."""

import json

import pytest

from moe_tune.cli import main
from moe_tune.evaluation.compare import aggregate, check_spec, load_spec

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
    assert "full seed 1: finished before, reused" in out and "full seed 2: training" in out
    assert first.stat().st_mtime == stamp
    rows = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    assert rows[1].startswith("full,2,")
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "± " in table and "1 of 2 training runs had finished before and were reused" in table
    assert "routing_drift is `-` where the runs evaluated no base model" in table  # eval.compare_base: false
    for plot in ("score_vs_trainable", "loss_curves"):
        assert (tmp_path / "out" / f"{plot}.png").stat().st_size > 0
    # asked for something else now: the finished runs are not passed off as its result
    assert main(["compare", str(write_spec(tmp_path, seeds=[1, 2])), "sft.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "variant 'full' seed 1: sft.max_steps is 3 now but was 2 in the finished run" in err
    assert "--overwrite" in err and first.stat().st_mtime == stamp


def test_a_group_the_eval_file_lacks_is_refused_before_anything_runs(tmp_path):
    from moe_tune.errors import MoeTuneError

    spec = load_spec(write_spec(tmp_path, group="new_phrasings"))
    with pytest.raises(MoeTuneError, match=r"group: no row of variant 'full''s first eval file .*heldout.jsonl"):
        check_spec(spec)
    check_spec(load_spec(write_spec(tmp_path, group="new_phrasing")))
    assert not (tmp_path / "out").exists()


def fake_run(tmp_path):
    """A finished run's folder, as measure() reads it: 450 held-out rows, 360 of group new_phrasing."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (run / "plan.json").write_text(json.dumps({"trainable_params": 10, "total_params": 100}))
    scores = lambda em, loss, n: {"exact_match": em, "loss": loss, "n": n}  # noqa: E731
    tuned = {"overall": scores(0.5, 1.0, 450), "per_group": {"new_phrasing": scores(0.8, 0.3, 360),
                                                             "unseen_task": scores(0.0, 5.0, 90)}}
    (run / "eval" / "report.json").write_text(json.dumps(
        {"heldout.jsonl": {"results": {"tuned": tuned}, "routing": {}}}))
    return run


def test_the_scored_group_is_the_specs_and_the_whole_file_by_default(tmp_path):
    from moe_tune.evaluation.compare import measure

    run = fake_run(tmp_path)
    assert measure(run, 1.0, 0.1)["heldout_exact_match"] == 0.5
    by_group = measure(run, 1.0, 0.1, "new_phrasing")
    assert by_group["heldout_exact_match"] == 0.8 and by_group["heldout_loss"] == 0.3


def test_the_heldout_line_names_the_file_and_the_rows_scored(tmp_path):
    from moe_tune.evaluation.compare import heldout_line, measure

    run = fake_run(tmp_path)
    whole, group = measure(run, 1.0, 0.1), measure(run, 1.0, 0.1, "new_phrasing")
    recorded = [whole[k] for k in ("heldout_file", "heldout_group", "heldout_rows")]
    assert recorded == ["heldout.jsonl", None, 450]
    assert heldout_line({"a": [whole], "b": [whole]}) == "Held-out columns: heldout.jsonl, all 450 rows."
    assert (heldout_line({"a": [group, group]})
            == "Held-out columns: heldout.jsonl, rows of group new_phrasing (360 rows).")
    assert heldout_line({"a": [whole], "b": [group]}) == (
        "Held-out columns: heldout.jsonl, all 450 rows (a); "
        "heldout.jsonl, rows of group new_phrasing (360 rows) (b).")
    assert heldout_line({"a": [{"heldout_exact_match": 0.5}]}) is None  # measured before rows were recorded


def measured(em, wall, curve=True):
    return {"heldout_exact_match": em, "wall_s": wall, "trainable_params": 1000, "routing_drift": 0.05,
            "curve": [(1, 2.0), (2, 1.0)] if curve else [], "eval_curve": [(2, 1.5)],
            "heldout_file": "data/heldout.jsonl", "heldout_group": "new_phrasing", "heldout_rows": 360}


@pytest.mark.parametrize("seeds", [1, 3])
def test_comparison_shows_a_spread_only_over_several_seeds(tmp_path, seeds):
    from moe_tune.evaluation.compare import COLUMNS, write_outputs

    runs = {"a": [measured(0.5 + 0.1 * i, 10 + 2 * i) for i in range(seeds)],
            "b": [measured(0.2, 5, curve=False) for _ in range(seeds)]}
    write_outputs(tmp_path, aggregate(runs), runs)
    md = (tmp_path / "comparison.md").read_text().splitlines()
    assert md[0] == "Held-out columns: data/heldout.jsonl, rows of group new_phrasing (360 rows)."
    table = [line for line in md if line.startswith("| a |") or line.startswith("| b |")]
    if seeds == 1:
        assert md[1] == "One seed per variant." and "±" not in "\n".join(md)
        assert table[0].startswith("| a | 50.0% | - | - | - | - | 1,000 | - | 10 | - | 0.050 | - |")
    else:
        assert md[1] == "Mean ± standard deviation over 3 seeds."
        assert table[0].startswith("| a | 60.0% ± 10.0% | - |") and "| 12 ± 2 |" in table[0]
        assert "| 20.0% ± 0.0% |" in table[1]
    csv_rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert csv_rows[0] == "variant,seeds," + ",".join(f"{c}_{s}" for c in COLUMNS for s in ("mean", "std"))
    b = csv_rows[2].split(",")
    assert b[:2] == ["b", str(seeds)] and float(b[2]) == pytest.approx(0.2) and b[3] == "0.0"  # std stays
    for plot in ("score_vs_trainable", "loss_curves", "routing_drift"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0


@pytest.mark.slow
def test_a_prune_grid_prunes_every_trained_run_and_reuses_what_it_pruned(tmp_path, capsys):
    grid = {"keep": [1.0, 0.5], "by": ["reap"], "rows": 32}
    assert main(["compare", str(write_spec(tmp_path, prune=grid))]) == 0
    out = tmp_path / "out"
    table = (out / "comparison.md").read_text()
    for name in ("full", "full-reap-0.5"):
        assert f"| {name} |" in table
    measured = json.loads((out / "full-reap-0.5" / "seed-1" / "compare_run.json").read_text())
    trained = json.loads((out / "full" / "seed-1" / "compare_run.json").read_text())
    assert measured["experts_kept"] == 4 and measured["params"] < trained["params"]
    assert measured["heldout_rows"] == trained["heldout_rows"]  # the same held-out rows
    assert (out / "score_vs_params.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["compare", str(write_spec(tmp_path, prune=grid))]) == 0
    assert "pruned before, reused" in capsys.readouterr().out


def test_a_prune_grid_is_checked_with_the_spec(tmp_path, capsys):
    assert main(["compare", str(write_spec(tmp_path, prune={"keep": [0], "by": ["reap"]}))]) == 2
    assert "spec.yaml: prune.keep: keep: fractions in (0, 1]" in capsys.readouterr().err
    assert main(["compare", str(write_spec(tmp_path, prune={"keep": [0.5], "by": ["norm"]}))]) == 2
    assert "prune.by.0" in capsys.readouterr().err


def test_the_docs_list_every_key_of_the_spec_and_no_other():
    """docs/strategies.md's table of the spec's keys is bound to the schema."""
    import re

    from moe_tune.evaluation.compare import CompareSpec, PruneGrid

    text = (ROOT / "docs" / "strategies.md").read_text()
    table = text[text.index("### The spec's keys"):].split("\n\n")[1]
    documented = set(re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M))
    schema = set(CompareSpec.model_fields) | {f"prune.{key}" for key in PruneGrid.model_fields}
    assert documented == schema
