//! Typed access to GGUF metadata (candle's `Value` accessors are strict about the integer
//! width; writers differ, so read any integer or float width here).

use std::collections::HashMap;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Value;

/// The metadata of one GGUF file, with the architecture prefix (`llama.`, `qwen2.`) resolved.
pub(crate) struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    /// `general.architecture`.
    pub arch: String,
}

impl<'a> Meta<'a> {
    pub fn new(md: &'a HashMap<String, Value>) -> anyhow::Result<Self> {
        let arch = match md.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("`general.architecture` is not a string: {other:?}"),
            None => bail!("the GGUF file has no `general.architecture`"),
        };
        Ok(Meta { md, arch })
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.md.get(key)
    }

    /// An integer of any width; `None` when the key is absent.
    pub fn uint(&self, key: &str) -> anyhow::Result<Option<u64>> {
        self.get(key)
            .map(|v| value_to_u64(v).with_context(|| format!("GGUF metadata `{key}`")))
            .transpose()
    }

    /// A number of any type, as f64. An f32 is converted through its shortest decimal form,
    /// so `1e-5` stored as f32 reads back as `1e-5` (the value the model was written with).
    pub fn float(&self, key: &str) -> anyhow::Result<Option<f64>> {
        self.get(key)
            .map(|v| value_to_f64(v).with_context(|| format!("GGUF metadata `{key}`")))
            .transpose()
    }

    pub fn string(&self, key: &str) -> anyhow::Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => bail!("GGUF metadata `{key}` is not a string: {}", short(other)),
        }
    }

    pub fn boolean(&self, key: &str) -> anyhow::Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Ok(Some(
                value_to_u64(other)
                    .with_context(|| format!("GGUF metadata `{key}` is not a boolean"))?
                    != 0,
            )),
        }
    }

    pub fn strings(&self, key: &str) -> anyhow::Result<Option<Vec<&'a str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    other => bail!("GGUF metadata `{key}` holds a non-string {}", short(other)),
                })
                .collect::<anyhow::Result<Vec<_>>>()
                .map(Some),
            Some(other) => bail!("GGUF metadata `{key}` is not an array: {}", short(other)),
        }
    }

    pub fn uints(&self, key: &str) -> anyhow::Result<Option<Vec<u64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| value_to_u64(v).with_context(|| format!("GGUF metadata `{key}`")))
                .collect::<anyhow::Result<Vec<_>>>()
                .map(Some),
            Some(other) => bail!("GGUF metadata `{key}` is not an array: {}", short(other)),
        }
    }

    /// `<arch>.<suffix>` as an integer.
    pub fn arch_uint(&self, suffix: &str) -> anyhow::Result<Option<u64>> {
        self.uint(&format!("{}.{suffix}", self.arch))
    }

    /// `<arch>.<suffix>` as an integer that must be present.
    pub fn arch_uint_req(&self, suffix: &str) -> anyhow::Result<u64> {
        let key = format!("{}.{suffix}", self.arch);
        self.uint(&key)?
            .with_context(|| format!("the GGUF file has no `{key}`"))
    }

    pub fn arch_float(&self, suffix: &str) -> anyhow::Result<Option<f64>> {
        self.float(&format!("{}.{suffix}", self.arch))
    }

    pub fn arch_string(&self, suffix: &str) -> anyhow::Result<Option<&'a str>> {
        self.string(&format!("{}.{suffix}", self.arch))
    }
}

fn short(v: &Value) -> String {
    let s = format!("{v:?}");
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

fn value_to_u64(v: &Value) -> anyhow::Result<u64> {
    let signed = |i: i64| u64::try_from(i).with_context(|| format!("negative value {i}"));
    Ok(match v {
        Value::U8(x) => u64::from(*x),
        Value::U16(x) => u64::from(*x),
        Value::U32(x) => u64::from(*x),
        Value::U64(x) => *x,
        Value::I8(x) => signed(i64::from(*x))?,
        Value::I16(x) => signed(i64::from(*x))?,
        Value::I32(x) => signed(i64::from(*x))?,
        Value::I64(x) => signed(*x)?,
        Value::Bool(b) => u64::from(*b),
        other => bail!("expected an integer, found {}", short(other)),
    })
}

fn value_to_f64(v: &Value) -> anyhow::Result<f64> {
    Ok(match v {
        Value::F32(x) => shortest_f32(*x),
        Value::F64(x) => *x,
        other => value_to_u64(other)? as f64,
    })
}

/// The f64 whose shortest decimal form is the f32's shortest decimal form.
pub(crate) fn shortest_f32(x: f32) -> f64 {
    format!("{x}").parse::<f64>().unwrap_or(f64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_of_any_width() {
        let mut md = HashMap::new();
        md.insert("general.architecture".into(), Value::String("llama".into()));
        md.insert("llama.block_count".into(), Value::U32(30));
        md.insert("llama.context_length".into(), Value::U64(8192));
        md.insert("llama.x".into(), Value::I32(-1));
        md.insert(
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        );
        let m = Meta::new(&md).unwrap();
        assert_eq!(m.arch, "llama");
        assert_eq!(m.arch_uint("block_count").unwrap(), Some(30));
        assert_eq!(m.arch_uint("context_length").unwrap(), Some(8192));
        assert!(m.arch_uint("x").is_err());
        assert_eq!(m.arch_uint("missing").unwrap(), None);
        assert!(m.arch_uint_req("missing").is_err());
        assert_eq!(
            m.arch_float("attention.layer_norm_rms_epsilon").unwrap(),
            Some(1e-5)
        );
        assert_eq!(shortest_f32(100000.0), 100000.0);
    }
}
