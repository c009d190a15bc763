//! Counters and latency histograms the workers update without locks or
//! allocation; a snapshot for `osprey/{robot}/metrics` once a second.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

/// Histogram buckets: upper bounds in microseconds, roughly ×1.5 apart
/// from 50 µs to 30 s; the last bucket holds everything above.
const BOUNDS_US: [u64; 34] = [
    50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000,
    20_000, 30_000, 50_000, 75_000, 100_000, 150_000, 200_000, 300_000, 500_000, 750_000,
    1_000_000, 1_500_000, 2_000_000, 3_000_000, 5_000_000, 10_000_000, 20_000_000, 30_000_000,
];

/// A lock-free latency histogram.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

/// Summary of a histogram.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct HistSummary {
    /// Samples.
    pub count: u64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// Median (bucket upper bound), ms.
    pub p50_ms: f64,
    /// 90th percentile (bucket upper bound), ms.
    pub p90_ms: f64,
    /// 99th percentile (bucket upper bound), ms.
    pub p99_ms: f64,
    /// Largest sample, ms.
    pub max_ms: f64,
}

impl Histogram {
    /// Records one sample in milliseconds.
    pub fn record_ms(&self, ms: f64) {
        let us = (ms.max(0.0) * 1e3) as u64;
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Percentiles (upper bound of the bucket that holds them; the largest
    /// sample caps them).
    pub fn summary(&self) -> HistSummary {
        let counts: [u64; BOUNDS_US.len() + 1] =
            std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed));
        let n: u64 = counts.iter().sum();
        let max_us = self.max_us.load(Ordering::Relaxed);
        if n == 0 {
            return HistSummary::default();
        }
        let q = |p: f64| {
            let rank = ((n as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    let bound = BOUNDS_US.get(i).copied().unwrap_or(max_us);
                    return bound.min(max_us) as f64 / 1e3;
                }
            }
            max_us as f64 / 1e3
        };
        HistSummary {
            count: n,
            mean_ms: self.sum_us.load(Ordering::Relaxed) as f64 / n as f64 / 1e3,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: max_us as f64 / 1e3,
        }
    }
}

/// Figures of one perception model.
#[derive(Debug, Default)]
pub struct ModelMetrics {
    /// Frames that arrived for this model.
    pub received: AtomicU64,
    /// Frames processed and published.
    pub processed: AtomicU64,
    /// Frames replaced in their slot by a newer one before they ran.
    pub dropped: AtomicU64,
    /// Frames whose deadline passed before dispatch (dropped) or that
    /// finished after it (published late): `expired + late`.
    pub deadline_misses: AtomicU64,
    /// Frames dropped at dispatch because their deadline had passed.
    pub expired: AtomicU64,
    /// Frames that ran but finished after their deadline.
    pub late: AtomicU64,
    /// Frames that were malformed, too large or failed in the pipeline.
    pub errors: AtomicU64,
    /// Preprocessing latency.
    pub preprocess: Histogram,
    /// Engine latency.
    pub infer: Histogram,
    /// Decoding latency.
    pub decode: Histogram,
    /// Capture to publish.
    pub end_to_end: Histogram,
    /// Frames waiting in this model's slots (gauge).
    pub queue_depth: AtomicUsize,
}

/// Figures of the assistant.
#[derive(Debug, Default)]
pub struct AssistantMetrics {
    /// Questions accepted.
    pub questions: AtomicU64,
    /// Questions refused (busy, too long, bad text).
    pub rejected: AtomicU64,
    /// Questions being answered (gauge).
    pub active: AtomicUsize,
    /// Questions waiting for their prefill (gauge).
    pub waiting: AtomicUsize,
    /// Tokens generated.
    pub tokens: AtomicU64,
    /// Decode steps whose deadline passed before they ran.
    pub step_deadline_misses: AtomicU64,
    /// One decode step.
    pub step: Histogram,
    /// Time to first token.
    pub ttft: Histogram,
}

/// The whole daemon's figures.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Per model, in config order.
    pub models: Vec<ModelMetrics>,
    /// The assistant.
    pub assistant: AssistantMetrics,
    /// Frames on a camera no model listens to, or unparseable.
    pub unrouted_frames: AtomicU64,
    /// Bytes reserved for frame slots.
    pub frame_pool_bytes: AtomicUsize,
    /// Bytes reserved for engine contexts.
    pub arena_pool_bytes: AtomicUsize,
    /// Bytes reserved for the KV cache.
    pub kv_pool_bytes: AtomicUsize,
    /// KV blocks in use (gauge).
    pub kv_blocks_used: AtomicUsize,
    /// KV blocks in all.
    pub kv_blocks_total: AtomicUsize,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    /// Metrics for `n` models.
    pub fn new(n: usize) -> Metrics {
        Metrics {
            models: (0..n).map(|_| ModelMetrics::default()).collect(),
            ..Default::default()
        }
    }

    /// The JSON published on `osprey/{robot}/metrics`.
    pub fn snapshot(&self, names: &[String], budgets: [usize; 2]) -> serde_json::Value {
        let models: serde_json::Map<String, serde_json::Value> = self
            .models
            .iter()
            .zip(names)
            .map(|(m, name)| {
                (
                    name.clone(),
                    serde_json::json!({
                        "received": get(&m.received),
                        "processed": get(&m.processed),
                        "dropped": get(&m.dropped),
                        "deadline_misses": get(&m.deadline_misses),
                        "expired": get(&m.expired),
                        "late": get(&m.late),
                        "errors": get(&m.errors),
                        "queue_depth": m.queue_depth.load(Ordering::Relaxed),
                        "latency_ms": {
                            "preprocess": m.preprocess.summary(),
                            "infer": m.infer.summary(),
                            "decode": m.decode.summary(),
                            "end_to_end": m.end_to_end.summary(),
                        },
                    }),
                )
            })
            .collect();
        let a = &self.assistant;
        serde_json::json!({
            "models": models,
            "assistant": {
                "questions": get(&a.questions),
                "rejected": get(&a.rejected),
                "active": a.active.load(Ordering::Relaxed),
                "waiting": a.waiting.load(Ordering::Relaxed),
                "tokens": get(&a.tokens),
                "step_deadline_misses": get(&a.step_deadline_misses),
                "latency_ms": { "step": a.step.summary(), "ttft": a.ttft.summary() },
            },
            "unrouted_frames": get(&self.unrouted_frames),
            "pools": {
                "frame_bytes": self.frame_pool_bytes.load(Ordering::Relaxed),
                "frame_budget": budgets[0],
                "arena_bytes": self.arena_pool_bytes.load(Ordering::Relaxed),
                "arena_budget": budgets[1],
                "kv_bytes": self.kv_pool_bytes.load(Ordering::Relaxed),
                "kv_blocks_used": self.kv_blocks_used.load(Ordering::Relaxed),
                "kv_blocks_total": self.kv_blocks_total.load(Ordering::Relaxed),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_against_a_sorted_reference() {
        let h = Histogram::default();
        let samples: Vec<f64> = (1..=1000).map(|i| (i as f64) * 0.037).collect();
        for &s in &samples {
            h.record_ms(s);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.max_ms - 37.0).abs() < 1e-9);
        let mean: f64 = samples.iter().sum::<f64>() / 1000.0;
        assert!((s.mean_ms - mean).abs() < 1e-3, "{} vs {mean}", s.mean_ms);
        // A percentile is the upper bound of the bucket holding the exact
        // value: never below it, less than 1.5x above it.
        for (got, p) in [(s.p50_ms, 0.5), (s.p90_ms, 0.9), (s.p99_ms, 0.99)] {
            let exact = samples[(1000.0 * p) as usize - 1];
            assert!(
                got >= exact && got <= exact * 1.5 + 0.05,
                "p{p}: {got} vs {exact}"
            );
        }
        assert_eq!(Histogram::default().summary(), HistSummary::default());
        // Beyond the last bound: reported as the maximum.
        let big = Histogram::default();
        big.record_ms(100_000.0);
        assert_eq!(big.summary().p99_ms, 100_000.0);
    }
}
