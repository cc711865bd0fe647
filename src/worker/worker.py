"""ferrotune's training worker, run inside the embedded interpreter of `ferrotune worker`.

It calls LlamaFactory's `run_exp` in-process and reports progress as JSON lines on the
events file descriptor that the Rust side hands over. Everything else Python (and C code)
prints goes to the task's log file.
"""
import json
import math
import os
import sys
import time
import traceback

_t0 = time.time()
_out = None


def emit(kind, **fields):
    fields["type"] = kind
    fields["t"] = round(time.time() - _t0, 3)
    for k, v in list(fields.items()):
        if isinstance(v, float) and not math.isfinite(v):
            fields[k] = str(v)  # JSON has no NaN/inf; keep them visible as strings
    _out.write(json.dumps(fields, default=str) + "\n")
    _out.flush()


def main(args_json, events_fd):
    global _out
    _out = os.fdopen(events_fd, "w", buffering=1)
    args = json.loads(args_json)
    emit("starting", pid=os.getpid(), python=sys.version.split()[0])
    try:
        from transformers import TrainerCallback
        from llamafactory.train.tuner import run_exp
    except BaseException as e:  # noqa: BLE001 - report whatever stops the import
        emit("error", stage="import", message=f"{type(e).__name__}: {e}",
             traceback=traceback.format_exc())
        return 3

    class Reporter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            emit("train_begin", total_steps=state.max_steps,
                 num_epochs=float(args.num_train_epochs))

        def on_step_end(self, args, state, control, **kwargs):
            emit("step", step=state.global_step, total_steps=state.max_steps,
                 epoch=state.epoch)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            base = {"step": state.global_step, "total_steps": state.max_steps,
                    "epoch": state.epoch}
            if "loss" in logs:
                emit("log", loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                     grad_norm=logs.get("grad_norm"), **base)
            elif any(k.startswith("eval_") for k in logs):
                emit("eval", metrics=logs, **base)
            elif "train_runtime" in logs:
                emit("train_end", metrics=logs, **base)

        def on_save(self, args, state, control, **kwargs):
            emit("checkpoint", step=state.global_step,
                 path=os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    try:
        run_exp(args=args, callbacks=[Reporter()])
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt/SystemExit included
        emit("error", stage="train", message=f"{type(e).__name__}: {e}",
             traceback=traceback.format_exc())
        traceback.print_exc()
        return 1
    emit("done")
    return 0
