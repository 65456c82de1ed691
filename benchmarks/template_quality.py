"""What a base checkpoint given ChatML learns, against the same recipe with the model's own template.

    python benchmarks/template_quality.py           # about 5 minutes on 2 CPU cores

Trains the quickstart recipe twice, side by side in one process and with the same seed: on the
shipped model as it is (its own chat template), and on the shipped model as a base checkpoint is
published (no chat template) with ``model.chat_template: chatml`` (new tokens, grown embeddings, a
new eos). Prints one JSON object with each run's held-out exact match on new phrasings and the gap
(target: ChatML at most 0.10 below the model's own template).

Where the gap comes from: ChatML puts the answer at a line start, which this tokenizer splits
unlike pretraining ("\\nWexsil" is three tokens, " Wexsil" one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_tune.cli import main  # noqa: E402

SHIPPED = ROOT / "data" / "tiny-moe"
# the in-training validation passes only report; without them each run trains the same rows
QUICKSTART = [str(ROOT / "recipes" / "quickstart.yaml"), "eval.compare_base=false", "eval.retention_file=null",
              "sft.eval_strategy=no"]


def as_base_checkpoint(dest: Path) -> Path:
    """The shipped model as base checkpoints are published: no chat template."""
    shutil.copytree(SHIPPED, dest, ignore=shutil.ignore_patterns("chat_template.jinja"))
    config = json.loads((dest / "tokenizer_config.json").read_text())
    if config.pop("chat_template", None) is not None:
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dest


def new_phrasing_exact_match(run: Path) -> float:
    (result,) = json.loads((run / "eval" / "report.json").read_text()).values()
    return result["results"]["tuned"]["per_group"]["new_phrasing"]["exact_match"]


def measure(seed: int, work: Path) -> dict:
    base = as_base_checkpoint(work / "base")
    runs = {"own_template": [], "chatml": [f"model.path={base}", "model.chat_template=chatml"]}
    scores = {}
    for name, overrides in runs.items():
        out = work / name
        with contextlib.redirect_stdout(sys.stderr):  # the training's log; stdout is the result alone
            code = main(["train", *QUICKSTART, *overrides, f"seed={seed}", f"output_dir={out}"])
        if code != 0:
            raise SystemExit(f"the {name} run failed")
        scores[name] = new_phrasing_exact_match(out)
    return {"seed": seed, **scores, "gap": round(scores["own_template"] - scores["chatml"], 4),
            "target_gap_at_most": 0.10}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        print(json.dumps(measure(args.seed, Path(work))))


if __name__ == "__main__":
    cli()
