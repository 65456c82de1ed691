"""Writes notebooks/compare_freezing_strategies.ipynb (without outputs).

    python scripts/make_notebook.py                 # write the notebook
    jupyter nbconvert --execute --inplace notebooks/compare_freezing_strategies.ipynb   # fill outputs

The notebook is generated so that its cells are reviewed as plain Python here; tests run it
with nbclient (tests/test_notebook.py).
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "compare_freezing_strategies.ipynb"

CELLS = [
    new_markdown_cell("""\
# Which parts of an MoE should you fine-tune?

This notebook runs a reduced version of `recipes/compare/freezing.yaml` on the tiny
pretrained MoE and the instruction data that ship in `data/`: a few freezing strategies, each
trained with the same data, steps and evaluation over two seeds, then compared on held-out
instructions. With the settings below it takes about 9 minutes on 2 CPU cores.

The full comparison (7 strategies, 400 steps, 3 seeds, about 25 minutes) is one command:

```
moe-tune compare recipes/compare/freezing.yaml
```"""),
    new_code_cell("""\
# Settings: a reduced comparison. Each variant is a set of recipe overrides on
# recipes/quickstart.yaml, taken from the shipped spec.
VARIANTS = ["full", "freeze_experts", "lora_experts", "esft"]
SEEDS = [1, 2]
STEPS = 150          # 150 x 32 rows = 2 epochs of the 2,400 training rows
EVAL_STEPS = 25      # a validation loss every 25 steps, for the loss curves
OUTPUT_DIR = "runs/notebook-freezing"
EXTRA = {}           # any other dotted recipe overrides for every run, e.g. {"eval.max_rows": 100}""",
                  metadata={"tags": ["parameters"]}),
    new_code_cell("""\
import os
from pathlib import Path

from IPython.display import Image, Markdown, display

from moe_tune.evaluation.compare import load_spec, run_comparison

# recipes name their files relative to the repository root
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
os.chdir(ROOT)

spec = load_spec("recipes/compare/freezing.yaml")
spec.variants = {name: spec.variants[name] for name in VARIANTS}
spec.seeds = SEEDS
spec.overrides = {**spec.overrides, "sft.max_steps": STEPS, "sft.eval_steps": EVAL_STEPS, **EXTRA}
spec.output_dir = OUTPUT_DIR
for name, overrides in spec.variants.items():
    print(f"{name:15s} {overrides}")"""),
    new_markdown_cell("""\
## Run it

Each variant x seed is its own `moe-tune train` process writing to
`OUTPUT_DIR/VARIANT/seed-N`. A finished run is skipped when this cell runs again, so an
interrupted comparison resumes; delete the folder to start over."""),
    new_code_cell("""\
out = run_comparison(spec)"""),
    new_markdown_cell("""\
## The table

Mean ± standard deviation over the seeds. `heldout_exact_match` and `heldout_loss` are on new
phrasings of the tasks seen in training; `gap` is held-out loss minus the final training loss
(a large gap is overfitting); `retention_loss` is the loss on pretraining-domain text
(`data/retention.txt`; the base model scores about 0.39), so a high value means the model forgot
what it knew. `routing_drift` is the Jensen-Shannon divergence between the tuned and the base
model's expert load, and `imbalance_cv` the coefficient of variation of expert load."""),
    new_code_cell("""\
display(Markdown((out / "comparison.md").read_text()))"""),
    new_markdown_cell("""\
## Score against trainable parameters

Each point is a variant (error bar: std over seeds). Points up and to the left are the cheap
strategies that still learn the task; a strategy whose error bar overlaps another's is not
distinguishable from it with this many seeds."""),
    new_code_cell("""\
display(Image(filename=str(out / "score_vs_trainable.png")))"""),
    new_markdown_cell("""\
## Loss curves

Training loss (solid) and validation loss (dashed) of each variant's first seed. Where the
training loss keeps falling while the validation loss flattens or rises, the variant is
overfitting the small instruction set; fewer steps, fewer trainable parts or expert dropout
(`recipes/compare/regularizers.yaml`) are the levers."""),
    new_code_cell("""\
display(Image(filename=str(out / "loss_curves.png")))"""),
    new_markdown_cell("""\
## Routing drift

How far each strategy moved the routing away from the base model. Freezing the router does
not freeze routing: the router's input changes when attention or the experts of earlier layers
train."""),
    new_code_cell("""\
display(Image(filename=str(out / "routing_drift.png")))"""),
    new_markdown_cell("""\
## One run up close

Every run has its own evaluation report with per-task scores and per-layer routing analytics.
Below: the expert load of the first variant's first seed, base against tuned."""),
    new_code_cell("""\
run = out / VARIANTS[0] / f"seed-{SEEDS[0]}" / "eval"
print((run / "report.md").read_text()[:1500])
display(Image(filename=str(run / "heldout_expert_load.png")))"""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    nbformat.validate(nb)
    OUT.parent.mkdir(exist_ok=True)
    nbformat.write(nb, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
