//! Failure diagnosis: a failed task's error and log tail, read for the causes researchers
//! meet most, turned into advice they can act on.

/// Advice for a failure, or `None` when nothing recognisable was found.
pub fn diagnose(error: &str, log_tail: &str) -> Option<String> {
    let text = format!("{error}\n{log_tail}");
    let lower = text.to_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let advice = if has(&[
        "out of memory",
        "outofmemoryerror",
        "cuda error: out of memory",
        "cannot allocate memory",
        "killed by signal 9",
    ]) {
        "Out of memory: lower batch_size (and raise gradient_accumulation_steps to keep the \
         effective batch), shorten cutoff_len, or use LoRA instead of a full fine-tune."
    } else if has(&[
        "loss became nan",
        "loss became inf",
        "loss became -inf",
        "loss is nan",
        "nan loss",
        "loss: nan",
        "'loss': nan",
        "inf or nan",
        "\"loss\": \"nan\"",
    ]) {
        "The loss became NaN/inf: lower the learning_rate (e.g. ×0.1), or try fp32/bf16 instead of fp16."
    } else if has(&[
        "cannot find valid samples",
        "no valid samples",
        "keyerror: 'conversations'",
        "keyerror: 'instruction'",
        "keyerror: 'messages'",
        "template not found",
        "does not support template",
    ]) {
        "The dataset does not fit the chosen format or template: check the dataset's format in \
         its preview and the task's template (leave it empty to choose one from the model)."
    } else if has(&[
        "no such file or directory",
        "is not a local folder",
        "does not appear to have a file",
        "no file named",
        "can't load tokenizer",
        "can't load the configuration",
    ]) && has(&["model", "tokenizer", "config"])
    {
        "The base model could not be loaded: check that its folder in the models dir is complete \
         (config.json, weights, tokenizer) — `ferrotune models pull` rebuilds it."
    } else if has(&[
        "training environment is missing",
        "no module named",
        "modulenotfounderror",
        "importerror",
    ]) {
        "The Python training environment is not ready: run `ferrotune setup` (or see \
         /api/system/status) and clone the task."
    } else if has(&["interrupted"]) {
        "The task was interrupted; clone it to run it again."
    } else {
        return None;
    };
    Some(advice.to_string())
}

#[cfg(test)]
mod tests {
    use super::diagnose;

    #[test]
    fn recognises_common_failures() {
        let oom = diagnose(
            "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
            "",
        );
        assert!(oom.unwrap().contains("batch_size"));
        let nan = diagnose("", "{'loss': nan, 'grad_norm': nan}\nerror");
        assert!(nan.unwrap().contains("learning_rate"));
        let nan = diagnose("FloatingPointError: the loss became nan at step 3", "");
        assert!(nan.unwrap().contains("learning_rate"));
        let env = diagnose("ModuleNotFoundError: No module named 'llamafactory'", "");
        assert!(env.unwrap().contains("ferrotune setup"));
        let data = diagnose(
            "ValueError: Cannot find valid samples, check `data/README.md`.",
            "",
        );
        assert!(data.unwrap().contains("format"));
        let model = diagnose(
            "OSError: Error no file named model.safetensors, or pytorch_model.bin, found in directory /m/x.",
            "",
        );
        assert!(model.unwrap().contains("base model could not be loaded"));
        assert_eq!(diagnose("something else entirely", "all fine"), None);
    }
}
