//! Comparing runs: the parameters that differ between tasks, what each run reported at its
//! end, and the comparison as CSV (`GET /api/tasks/compare`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

/// A task's specification flattened to dotted keys (`lora.rank`); arrays and scalars are
/// values.
pub fn flatten(spec: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", spec, &mut out);
    out
}

/// The parameters whose values are not the same in every one of `specs` (flattened), in key
/// order, each with its value per spec (null where a spec lacks it). `skip`: keys left out
/// (the name, shown apart).
pub fn differences(specs: &[BTreeMap<String, Value>], skip: &[&str]) -> Vec<(String, Vec<Value>)> {
    let keys: BTreeSet<&String> = specs.iter().flat_map(|s| s.keys()).collect();
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()))
        .filter_map(|k| {
            let values: Vec<Value> = specs
                .iter()
                .map(|s| s.get(k).cloned().unwrap_or(Value::Null))
                .collect();
            values
                .iter()
                .any(|v| v != &values[0])
                .then(|| (k.clone(), values))
        })
        .collect()
}

/// The numbers LlamaFactory wrote at the end of a run (`all_results.json` in its output
/// folder: `train_loss`, `eval_loss` when a validation split was held out, runtimes and
/// rates); empty when the run wrote none. Blocking: reads a file.
pub fn final_results(output_dir: &Path) -> BTreeMap<String, f64> {
    let path = output_dir.join("all_results.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        // A run that did not finish has none: nothing to say.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read a run's final results");
            return BTreeMap::new();
        }
    };
    let m = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            tracing::warn!(path = %path.display(), "a run's final results are not a JSON object");
            return BTreeMap::new();
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "a run's final results are not JSON");
            return BTreeMap::new();
        }
    };
    m.into_iter()
        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
        .collect()
}

/// One run's row of the comparison table.
pub struct Row<'a> {
    pub task_id: &'a str,
    pub name: &'a str,
    pub status: &'a str,
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub results: &'a BTreeMap<String, f64>,
}

/// The comparison as CSV: one row per run (id, name, status, steps, last logged loss), then
/// every final result any run reported, then the parameters that differ.
pub fn to_csv(rows: &[Row<'_>], differences: &[(String, Vec<Value>)]) -> anyhow::Result<String> {
    let result_keys: BTreeSet<&String> = rows.iter().flat_map(|r| r.results.keys()).collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = ["task_id", "name", "status", "steps", "final_loss"]
        .map(String::from)
        .to_vec();
    header.extend(result_keys.iter().map(|k| k.to_string()));
    header.extend(differences.iter().map(|(k, _)| k.clone()));
    w.write_record(&header)?;
    let num = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for (i, r) in rows.iter().enumerate() {
        let mut rec = vec![
            r.task_id.to_string(),
            r.name.to_string(),
            r.status.to_string(),
            r.steps.to_string(),
            num(r.final_loss),
        ];
        rec.extend(result_keys.iter().map(|k| num(r.results.get(*k).copied())));
        rec.extend(differences.iter().map(|(_, vs)| match &vs[i] {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            v => v.to_string(),
        }));
        w.write_record(&rec)?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_what_differs_is_listed_and_the_csv_quotes_what_it_must() {
        let a = flatten(
            &json!({"name": "a", "learning_rate": 1e-4, "lora": {"rank": 8, "alpha": 16},
                               "template": "chatml", "stop": ["x", "y"]}),
        );
        let b = flatten(
            &json!({"name": "b", "learning_rate": 2e-4, "lora": {"rank": 8, "alpha": 32},
                               "template": "chatml"}),
        );
        let d = differences(&[a, b], &["name"]);
        let keys: Vec<&str> = d.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["learning_rate", "lora.alpha", "stop"]);
        assert_eq!(d[2].1, [json!(["x", "y"]), Value::Null]);
        let results = BTreeMap::from([("train_loss".to_string(), 1.5)]);
        let none = BTreeMap::new();
        let rows = [
            Row {
                task_id: "t1",
                name: "first, \"quoted\"",
                status: "completed",
                steps: 5,
                final_loss: Some(1.25),
                results: &results,
            },
            Row {
                task_id: "t2",
                name: "second",
                status: "failed",
                steps: 2,
                final_loss: None,
                results: &none,
            },
        ];
        let csv = to_csv(&rows, &d).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "task_id,name,status,steps,final_loss,train_loss,learning_rate,lora.alpha,stop"
        );
        assert_eq!(
            lines[1],
            "t1,\"first, \"\"quoted\"\"\",completed,5,1.25,1.5,0.0001,16,\"[\"\"x\"\",\"\"y\"\"]\""
        );
        assert_eq!(lines[2], "t2,second,failed,2,,,0.0002,32,");
    }
}
