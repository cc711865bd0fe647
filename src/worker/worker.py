"""ferrotune's training worker, run inside the embedded interpreter of `ferrotune worker`
(or, for a multi-GPU task, by torchrun in every rank).

It calls LlamaFactory's `run_exp` in-process and appends progress as JSON lines to the
task's events file (only rank 0 reports). Everything else Python (and C code) prints goes
to the task's log file.

Signals: SIGUSR1 asks for "stop and save": at the next step end a checkpoint is saved and
training stops (the run then ends with a `stopped` event, exit code 5). A heartbeat event is
written every `heartbeat_secs` so the supervisor can tell a stuck worker from a slow step.
"""
import json
import math
import os
import signal
import sys
import threading
import time
import traceback

_t0 = time.time()
_out = None
_lock = threading.Lock()
_stop = threading.Event()
_rank = int(os.environ.get("RANK", "0"))

EXIT_DONE, EXIT_FAILED, EXIT_IMPORT, EXIT_STOPPED = 0, 1, 3, 5


def emit(kind, **fields):
    if _rank != 0 or _out is None:
        return
    fields["type"] = kind
    now = time.time()
    fields["t"] = round(now - _t0, 3)
    fields["ts"] = round(now, 4)
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # JSON has no NaN/inf; keep them visible as strings
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return v
    fields = {k: finite(v) for k, v in fields.items()}
    line = json.dumps(fields, default=str) + "\n"
    with _lock:  # one write per line: lines from threads never interleave
        _out.write(line)
        _out.flush()


def _heartbeat(interval):
    while not _stop.wait(interval):
        emit("heartbeat")


def main(args_json, events_path, heartbeat_secs=10.0, save_every_s=None):
    global _out
    if _rank == 0:
        _out = open(events_path, "a", buffering=1, encoding="utf-8")
    passes = json.loads(args_json)
    if isinstance(passes, dict):  # one run_exp call (the torchrun entry point's job.json)
        passes = [passes]
    emit("starting", pid=os.getpid(), python=sys.version.split()[0])
    stop_requested = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: stop_requested.set())
    threading.Thread(target=_heartbeat, args=(heartbeat_secs,), daemon=True).start()
    try:
        from transformers import TrainerCallback
        from llamafactory.train.tuner import run_exp
    except BaseException as e:  # noqa: BLE001 - report whatever stops the import
        emit("error", stage="import", message=f"{type(e).__name__}: {e}",
             traceback=traceback.format_exc())
        return EXIT_IMPORT

    # An evaluation's passes (loss, then generation) report one progress: batches done over
    # the batches of every pass (each pass reads the same rows).
    predicted = {"batches": 0, "per_pass": 0}

    saved_at = [time.monotonic()]

    class Reporter(TrainerCallback):
        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if state.max_steps:  # evaluation during training: the training steps tell it
                return
            if not predicted["per_pass"] and eval_dataloader is not None:
                predicted["per_pass"] = len(eval_dataloader)
            predicted["batches"] += 1
            emit("step", step=predicted["batches"],
                 total_steps=predicted["per_pass"] * len(passes))
            if stop_requested.is_set():
                raise KeyboardInterrupt("stopped on request")

        def on_predict(self, args, state, control, metrics=None, **kwargs):
            emit("eval", metrics=dict(metrics or {}), step=predicted["batches"])

        def on_train_begin(self, args, state, control, **kwargs):
            saved_at[0] = time.monotonic()
            emit("train_begin", total_steps=state.max_steps, start_step=state.global_step,
                 num_epochs=float(args.num_train_epochs))
            if stop_requested.is_set():
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            emit("step", step=state.global_step, total_steps=state.max_steps,
                 epoch=state.epoch)
            # Time-based checkpoints, besides save_steps: the Trainer saves after this hook.
            if save_every_s and time.monotonic() - saved_at[0] >= save_every_s:
                control.should_save = True
            if stop_requested.is_set():
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            # (An evaluation alone has no training steps: its batches tell the progress.)
            base = {"step": state.global_step, "total_steps": state.max_steps,
                    "epoch": state.epoch} if state.max_steps else {}
            if "loss" in logs:
                # A stage's own figures (DPO/KTO: rewards/*, logps/*, kl).
                extra = {k: v for k, v in logs.items()
                         if k not in ("loss", "learning_rate", "grad_norm", "epoch")
                         and isinstance(v, (int, float)) and not isinstance(v, bool)}
                emit("log", loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                     grad_norm=logs.get("grad_norm"), metrics=extra, **base)
                loss = logs.get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    # Training on cannot recover: stop now instead of burning the GPU.
                    raise FloatingPointError(
                        f"the loss became {loss} at step {state.global_step}")
            elif any(k.startswith("eval_") for k in logs):
                emit("eval", metrics=logs, **base)
            elif "train_runtime" in logs:
                emit("train_end", metrics=logs, **base)

        def on_save(self, args, state, control, **kwargs):
            saved_at[0] = time.monotonic()
            emit("checkpoint", step=state.global_step,
                 path=os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    try:
        for args in passes:
            if stop_requested.is_set():
                break
            run_exp(args=args, callbacks=[Reporter()])
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt/SystemExit included
        if not (isinstance(e, KeyboardInterrupt) and stop_requested.is_set()):
            emit("error", stage="train", message=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc())
            traceback.print_exc()
            return EXIT_FAILED
    finally:
        _stop.set()
    if stop_requested.is_set():
        emit("stopped")
        return EXIT_STOPPED
    emit("done")
    return EXIT_DONE


if __name__ == "__main__":  # torchrun entry point: launch.py JOB_JSON
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    sys.exit(main(json.dumps(job["args"]), job["events_file"], job.get("heartbeat_secs", 10.0),
                  job.get("save_every_s")))
