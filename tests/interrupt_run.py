"""Test tool: runs ``moe-tune train`` in this process and sends the process a real signal in
the middle of one phase of the run.

    python tests/interrupt_run.py PHASE SIGNAL TRAIN_ARGUMENTS...

PHASE is where the signal comes: ``train`` (during the third optimizer step), ``save`` (the
weights written, the tokenizer not yet), ``evaluate`` (as the first file is scored) or
``report`` (as the report is written). SIGNAL is SIGINT, SIGTERM or SIGKILL.
"""

import os
import signal
import sys

from moe_tune import cli
from moe_tune.evaluation import report
from moe_tune.training import callbacks, pipeline, run_dir


def hit() -> None:
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))


def during_third_step(guard=callbacks.GradientGuard.on_pre_optimizer_step):
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 2:
            hit()
        return guard(self, args, state, control, **kwargs)
    return on_pre_optimizer_step


def save_pretrained(model, tokenizer, final):
    model.config.use_cache = True
    with run_dir.folder_in_place(final) as tmp:
        model.save_pretrained(tmp)
        hit()
        tokenizer.save_pretrained(tmp)
    return final


def before(function):
    def hit_first(*args, **kwargs):
        hit()
        return function(*args, **kwargs)
    return hit_first


if __name__ == "__main__":
    phase = sys.argv[1]
    if phase == "train":
        callbacks.GradientGuard.on_pre_optimizer_step = during_third_step()
    elif phase == "save":
        run_dir.save_pretrained = save_pretrained
    elif phase == "evaluate":
        report.evaluate = before(report.evaluate)
    elif phase == "report":
        pipeline.write_report = before(pipeline.write_report)
    sys.exit(cli.main(sys.argv[3:]))
