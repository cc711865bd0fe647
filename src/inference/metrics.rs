//! The engine's serving metrics, kept with `prometheus-client` (the Prometheus project's Rust
//! client) and served by the server's `/metrics`: how many requests wait and run per model and
//! the KV cache they reserve, the size and duration of each batched step, tokens generated,
//! time to first token, and the adapter cache's hits, misses and evictions. Tokens per second is
//! `rate(ferrotune_tokens_generated_total[1m])`.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type ModelLabel = Vec<(String, String)>;

/// Cheap to clone: every metric is shared (an `Arc` inside).
#[derive(Clone)]
pub struct EngineMetrics {
    pub queue_depth: Family<ModelLabel, Gauge>,
    pub active_sequences: Family<ModelLabel, Gauge>,
    /// KV-cache bytes the sequences in a model's batch have reserved (`kv_cache_mb` bounds it).
    pub kv_reserved: Family<ModelLabel, Gauge>,
    /// KV-cache bytes one position of a sequence takes in a model (its precision shows here).
    pub kv_bytes_per_token: Family<ModelLabel, Gauge>,
    /// Sequences per batched step.
    pub batch_sequences: Histogram,
    /// Token rows per batched step (decode tokens plus prompt-chunk tokens).
    pub batch_rows: Histogram,
    pub step_seconds: Histogram,
    pub tokens_generated: Counter,
    pub time_to_first_token: Histogram,
    pub adapter_hits: Counter,
    pub adapter_misses: Counter,
    pub adapter_evictions: Counter,
    /// Sequences that started from a kept sequence's KV cache, and the prompt tokens they
    /// did not run again.
    pub prefix_hits: Counter,
    pub prefix_tokens: Counter,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            queue_depth: Family::default(),
            active_sequences: Family::default(),
            kv_reserved: Family::default(),
            kv_bytes_per_token: Family::default(),
            batch_sequences: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            tokens_generated: Counter::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            adapter_hits: Counter::default(),
            adapter_misses: Counter::default(),
            adapter_evictions: Counter::default(),
            prefix_hits: Counter::default(),
            prefix_tokens: Counter::default(),
        }
    }
}

impl EngineMetrics {
    /// Adds every metric to `registry` (names get the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "queue_depth",
            "Requests waiting for a place in a model's batch",
            self.queue_depth.clone(),
        );
        registry.register(
            "active_sequences",
            "Sequences in a model's batch",
            self.active_sequences.clone(),
        );
        registry.register(
            "kv_cache_reserved_bytes",
            "KV-cache bytes reserved by the sequences in a model's batch",
            self.kv_reserved.clone(),
        );
        registry.register(
            "kv_cache_bytes_per_token",
            "KV-cache bytes one position of a sequence takes in a model",
            self.kv_bytes_per_token.clone(),
        );
        registry.register(
            "batch_sequences",
            "Sequences advanced by one batched step",
            self.batch_sequences.clone(),
        );
        registry.register(
            "batch_rows",
            "Token rows run by one batched step (decode tokens and prompt chunks)",
            self.batch_rows.clone(),
        );
        registry.register(
            "step_seconds",
            "Duration of one batched forward step",
            self.step_seconds.clone(),
        );
        registry.register(
            "tokens_generated",
            "Tokens generated",
            self.tokens_generated.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a request's arrival at the engine to its first generated token",
            self.time_to_first_token.clone(),
        );
        registry.register(
            "adapter_cache_hits",
            "Adapter lookups served from the cache",
            self.adapter_hits.clone(),
        );
        registry.register(
            "adapter_cache_misses",
            "Adapter lookups that loaded the adapter",
            self.adapter_misses.clone(),
        );
        registry.register(
            "adapter_cache_evictions",
            "Adapters evicted from the cache to make room",
            self.adapter_evictions.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Sequences that started from a kept sequence's KV cache (a shared prompt start)",
            self.prefix_hits.clone(),
        );
        registry.register(
            "prefix_cache_tokens",
            "Prompt tokens not run again thanks to the prefix cache",
            self.prefix_tokens.clone(),
        );
    }

    pub(crate) fn set_load(&self, model: &str, waiting: usize, active: usize, reserved: usize) {
        let label = vec![("model".to_string(), model.to_string())];
        self.queue_depth.get_or_create(&label).set(waiting as i64);
        self.active_sequences
            .get_or_create(&label)
            .set(active as i64);
        self.kv_reserved
            .get_or_create(&label)
            .set(i64::try_from(reserved).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_kv_bytes_per_token(&self, model: &str, bytes: usize) {
        let label = vec![("model".to_string(), model.to_string())];
        self.kv_bytes_per_token
            .get_or_create(&label)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub(crate) fn record_step(&self, sequences: usize, rows: usize, took: Duration) {
        self.batch_sequences.observe(sequences as f64);
        self.batch_rows.observe(rows as f64);
        self.step_seconds.observe(took.as_secs_f64());
    }
}
