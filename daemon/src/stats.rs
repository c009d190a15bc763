//! Latency statistics.

use serde::Serialize;

/// trtexec-style latency summary, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Fastest run.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// 50th percentile.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest run.
    pub max: f64,
}

/// Nearest-rank percentile of sorted samples (`q` in 0..=100).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median (mean of the middle two for even counts).
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

impl LatencySummary {
    /// Summarises samples in milliseconds.
    pub fn from_samples(samples: &[f64]) -> LatencySummary {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        LatencySummary {
            min: s.first().copied().unwrap_or(f64::NAN),
            mean: if s.is_empty() {
                f64::NAN
            } else {
                s.iter().sum::<f64>() / s.len() as f64
            },
            median: median(&s),
            p90: percentile(&s, 90.0),
            p99: percentile(&s, 99.0),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_samples() {
        let samples: Vec<f64> = (1..=100).rev().map(|i| i as f64).collect();
        let s = LatencySummary::from_samples(&samples);
        assert_eq!((s.min, s.max), (1.0, 100.0));
        assert_eq!(s.median, 50.5);
        assert_eq!(s.p90, 90.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.mean, 50.5);
    }

    #[test]
    fn percentile_edges() {
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
    }
}
