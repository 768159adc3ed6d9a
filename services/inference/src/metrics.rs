//! What the engines measure, as Prometheus metrics (the `prometheus-client` crate): time
//! to first token, inter-token latency, step time, batch size and tokens per step, queue
//! wait, and counters of preemptions, chunked prefills and isolated poison requests. The
//! gateway registers them on every `/metrics` scrape ([`EngineMetrics::register`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The engines' metrics (clones share the same series).
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// Submission to the first token delivered, per request (in this process).
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of one request.
    pub inter_token_latency: Histogram,
    /// Wall time of one engine step (schedule, forward, sample, journal, deliver).
    pub step_time: Histogram,
    /// The forward alone within a step (the rest of `step_time` is the engine's own work).
    pub forward_time: Histogram,
    /// Sequences in one step's batch.
    pub batch_sequences: Histogram,
    /// Token rows in one step's batch (decodes plus prefill chunks).
    pub batch_tokens: Histogram,
    /// Submission to the first step that ran the request.
    pub queue_wait: Histogram,
    /// Sequences preempted because KV memory ran out.
    pub preemptions: Counter,
    /// Prefill steps that covered only part of a prompt (or of a recompute).
    pub chunked_prefills: Counter,
    /// Requests failed alone because their step kept crashing the engine.
    pub poisoned: Counter,
    /// Steps run on a subset of the batch to find a poison request.
    pub isolation_steps: Counter,
    /// Requests waiting for admission.
    pub admission_queue: Gauge,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            inter_token_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            step_time: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            forward_time: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            batch_sequences: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            batch_tokens: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            queue_wait: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            preemptions: Counter::default(),
            chunked_prefills: Counter::default(),
            poisoned: Counter::default(),
            isolation_steps: Counter::default(),
            admission_queue: Gauge::default(),
        }
    }
}

impl EngineMetrics {
    /// Adds every series to `registry` (names prefixed `llmos_`).
    pub fn register(&self, registry: &mut Registry) {
        let seconds = |registry: &mut Registry, name: &str, help: &str, h: &Histogram| {
            registry.register_with_unit(name, help, Unit::Seconds, h.clone());
        };
        seconds(
            registry,
            "llmos_time_to_first_token",
            "Submission to the first token delivered",
            &self.time_to_first_token,
        );
        seconds(
            registry,
            "llmos_inter_token_latency",
            "Time between consecutive tokens of a request",
            &self.inter_token_latency,
        );
        seconds(
            registry,
            "llmos_engine_step",
            "Wall time of one engine step",
            &self.step_time,
        );
        seconds(
            registry,
            "llmos_engine_forward",
            "The batched forward within an engine step",
            &self.forward_time,
        );
        seconds(
            registry,
            "llmos_queue_wait",
            "Submission to the first engine step that ran the request",
            &self.queue_wait,
        );
        registry.register(
            "llmos_engine_batch_sequences",
            "Sequences in one engine step",
            self.batch_sequences.clone(),
        );
        registry.register(
            "llmos_engine_batch_tokens",
            "Token rows in one engine step",
            self.batch_tokens.clone(),
        );
        registry.register(
            "llmos_preemptions",
            "Sequences preempted because KV memory ran out",
            self.preemptions.clone(),
        );
        registry.register(
            "llmos_chunked_prefills",
            "Prefill steps that covered only part of a prompt or recompute",
            self.chunked_prefills.clone(),
        );
        registry.register(
            "llmos_poisoned_requests",
            "Requests failed alone because their step kept crashing the engine",
            self.poisoned.clone(),
        );
        registry.register(
            "llmos_isolation_steps",
            "Steps run on part of a batch to find the request that crashes it",
            self.isolation_steps.clone(),
        );
        registry.register(
            "llmos_admission_queue",
            "Requests waiting for admission",
            self.admission_queue.clone(),
        );
    }
}
