//! Clipping thresholds from histograms of `|x|`.
//!
//! * **Entropy** — TensorRT's IInt8EntropyCalibrator2: for every candidate
//!   number of bins `i` from 128 to 2048, the reference distribution `P` is
//!   the first `i` bins with everything beyond folded into bin `i − 1`; the
//!   candidate `Q` merges the first `i` bins into 128 quantization levels of
//!   equal width and spreads each level's count back evenly over the bins
//!   that held values. The `i` with the least KL divergence `KL(P‖Q)` wins; the
//!   threshold is `(i + 0.5) × bin width`.
//!
//!   Exact zeros are left out of the histograms (see
//!   [`TensorStats::zeros`]): at the 128-bin candidate every bin is its own
//!   level, so a ReLU's zero spike is represented perfectly there and
//!   smeared over 16 bins at the full range — the search would clip 15-25%
//!   of a ReLU6 activation to avoid that (measured on EfficientNet-Lite0).
//! * **Percentile** — the smallest `|x|` (bin upper edge) below which the
//!   given percentage of values (zeros included) lies.
//! * **MinMax** — `max |x|`.

use crate::stats::{TensorStats, BINS};

/// Quantization levels of the candidate distribution (INT8's positive half).
pub const LEVELS: usize = 128;

/// How thresholds are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// KL-divergence search (TensorRT's entropy calibrator 2).
    Entropy,
    /// A percentile of `|x|`, e.g. 99.99.
    Percentile(f64),
    /// The largest `|x|`.
    MinMax,
}

impl Method {
    /// Parses `entropy`, `percentile` (with `pct`) or `minmax`.
    pub fn parse(name: &str, pct: f64) -> Option<Method> {
        match name {
            "entropy" => Some(Method::Entropy),
            "percentile" if pct > 0.0 && pct <= 100.0 => Some(Method::Percentile(pct)),
            "minmax" | "min-max" => Some(Method::MinMax),
            _ => None,
        }
    }

    /// The header line of a calibration cache made with this method.
    pub fn cache_header(self) -> &'static str {
        match self {
            Method::Entropy => "TRT-8601-EntropyCalibration2",
            Method::Percentile(_) => "TRT-8601-PercentileCalibration",
            Method::MinMax => "TRT-8601-MinMaxCalibration",
        }
    }

    /// The threshold for one tensor (0 when it held nothing but zeros).
    pub fn threshold(self, s: &TensorStats) -> f32 {
        let amax = s.absmax();
        if amax <= 0.0 || s.hist.len() != BINS {
            return amax;
        }
        let w = s.bin_width();
        match self {
            Method::MinMax => amax,
            Method::Percentile(p) => percentile_with_zeros(&s.hist, s.zeros, p) as f32 * w,
            Method::Entropy => {
                let i = entropy_bins(&s.hist);
                ((i as f32 + 0.5) * w).min(amax)
            }
        }
    }
}

/// [`percentile`] with `zeros` extra values at 0.
fn percentile_with_zeros(hist: &[u64], zeros: u64, p: f64) -> usize {
    let total: u64 = hist.iter().sum::<u64>() + zeros;
    let want = (total as f64 * p / 100.0).ceil() as u64;
    if want <= zeros {
        return 0;
    }
    let rest: u64 = total - zeros;
    percentile(hist, 100.0 * (want - zeros) as f64 / rest.max(1) as f64)
}

/// Bins (upper edge, in bins) below which `p` percent of the mass lies.
pub fn percentile(hist: &[u64], p: f64) -> usize {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = (total as f64 * p / 100.0).ceil() as u64;
    let mut seen = 0;
    for (i, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= want {
            return i + 1;
        }
    }
    hist.len()
}

/// The entropy calibrator's choice: how many bins to keep.
pub fn entropy_bins(hist: &[u64]) -> usize {
    let n = hist.len();
    if n <= LEVELS {
        return n;
    }
    let mut best = (f64::INFINITY, n);
    let mut p = vec![0f64; n];
    let mut q = vec![0f64; n];
    let mut tail: u64 = hist[LEVELS..].iter().sum();
    for i in LEVELS..=n {
        // Outliers beyond bin i-1 fold into it.
        if i > LEVELS {
            tail -= hist[i - 1];
        }
        let p = &mut p[..i];
        for (pj, &h) in p.iter_mut().zip(&hist[..i]) {
            *pj = h as f64;
        }
        p[i - 1] += tail as f64;
        let q = &mut q[..i];
        candidate(&hist[..i], p, q);
        let kl = kl_divergence(p, q);
        if kl < best.0 {
            best = (kl, i);
        }
    }
    best.1
}

/// Merges the `i` bins of `h` into [`LEVELS`] groups of (nearly) equal
/// width — bin `k` belongs to group `k·LEVELS/i` — and spreads each group's
/// count evenly over its bins that were non-zero in `h`; empty bins stay
/// empty. (Integer group widths would leave the last group with up to 127
/// extra bins for `i` < 256 and bias the search toward those `i`.)
fn candidate(h: &[u64], _p: &[f64], q: &mut [f64]) {
    let i = h.len();
    let group = |k: usize| k * LEVELS / i;
    let mut sums = [0f64; LEVELS];
    let mut nonzero = [0usize; LEVELS];
    for (k, &c) in h.iter().enumerate() {
        if c > 0 {
            sums[group(k)] += c as f64;
            nonzero[group(k)] += 1;
        }
    }
    for (k, (qk, &c)) in q.iter_mut().zip(h).enumerate() {
        let g = group(k);
        *qk = if c > 0 {
            sums[g] / nonzero[g] as f64
        } else {
            0.0
        };
    }
}

/// `KL(P‖Q)` of two unnormalised distributions over the same bins. Bins
/// where `P` has mass and `Q` has none are smoothed with a small epsilon
/// (taken from the non-zero bins), as the reference implementations do.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let ps: f64 = p.iter().sum();
    let qs: f64 = q.iter().sum();
    if ps <= 0.0 {
        return 0.0;
    }
    if qs <= 0.0 {
        return f64::INFINITY;
    }
    const EPS: f64 = 1e-4;
    let zeros = q
        .iter()
        .zip(p)
        .filter(|(&qv, &pv)| qv == 0.0 && pv > 0.0)
        .count();
    let nonzero = q.iter().filter(|&&v| v > 0.0).count().max(1);
    let take = EPS * zeros as f64 / nonzero as f64;
    let mut kl = 0.0;
    for (&pv, &qv) in p.iter().zip(q) {
        if pv <= 0.0 {
            continue;
        }
        let pn = pv / ps;
        let qn = if qv > 0.0 {
            (qv / qs - take).max(EPS * 1e-3)
        } else {
            EPS
        };
        kl += pn * (pn / qn).ln();
    }
    kl
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Collector;

    /// Deterministic normal samples (Box-Muller over a xorshift).
    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        let mut u = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (a, b) = (u(), u());
                ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
            })
            .collect()
    }

    fn stats_of(x: &[f32]) -> TensorStats {
        let mut c = Collector::new();
        c.observe("t", x);
        c.start_histograms();
        c.observe("t", x);
        c.stats()[0].clone()
    }

    #[test]
    fn uniform_keeps_the_whole_range() {
        let x: Vec<f32> = (0..200_000).map(|i| (i as f32 + 0.5) / 200_000.0).collect();
        let s = stats_of(&x);
        assert_eq!(Method::MinMax.threshold(&s), s.absmax());
        // A flat distribution loses nothing to 128 levels, while any
        // clipping folds mass into one bin: the full range wins.
        let e = Method::Entropy.threshold(&s);
        assert!((e - 1.0).abs() <= 2.0 * s.bin_width(), "{e}");
        let p = Method::Percentile(99.99).threshold(&s);
        assert!((p - 0.9999).abs() <= s.bin_width(), "{p}");
        let p = Method::Percentile(50.0).threshold(&s);
        assert!((p - 0.5).abs() <= s.bin_width(), "{p}");
    }

    #[test]
    fn gaussian_with_outliers_clips_the_outliers() {
        let mut x = normal(400_000, 7);
        x.extend([60.0, -55.0, 58.0, 59.5, -60.0]);
        let s = stats_of(&x);
        assert_eq!(Method::MinMax.threshold(&s), 60.0);
        // 99.99% of |N(0,1)| lies below 3.89.
        let p = Method::Percentile(99.99).threshold(&s);
        assert!((p - 3.89).abs() < 0.1, "{p}");
        // The KL search keeps the bulk and clips the outliers: a few
        // standard deviations, far below the outliers.
        let e = Method::Entropy.threshold(&s);
        assert!(e > 2.0 && e < 8.0, "{e}");
    }

    #[test]
    fn relu_zeros_do_not_drive_the_threshold() {
        // Half exact zeros, half |N(0,1)|, and a few large values.
        let mut x: Vec<f32> = normal(200_000, 3).iter().map(|v| v.abs()).collect();
        x.extend(vec![0.0; 200_000]);
        x.extend([40.0, 38.0]);
        let s = stats_of(&x);
        assert_eq!(s.zeros, 200_000);
        let e = Method::Entropy.threshold(&s);
        assert!(e > 2.0 && e < 8.0, "{e}");
        // Below the 50th percentile everything is an exact zero.
        assert_eq!(Method::Percentile(40.0).threshold(&s), 0.0);
        let p = Method::Percentile(75.0).threshold(&s);
        // 75% of x = the median of |N(0,1)| = 0.674.
        assert!((p - 0.674).abs() < 0.05, "{p}");
    }

    #[test]
    fn thresholds_scale_with_the_data() {
        // Histograms are relative to max|x|, so scaling the data scales
        // every threshold by the same factor.
        let x: Vec<f32> = normal(100_000, 11).iter().map(|v| v * v.abs()).collect();
        let y: Vec<f32> = x.iter().map(|v| v * 3.0).collect();
        let (sx, sy) = (stats_of(&x), stats_of(&y));
        for m in [Method::Entropy, Method::MinMax, Method::Percentile(99.9)] {
            let (tx, ty) = (m.threshold(&sx), m.threshold(&sy));
            assert!((ty - 3.0 * tx).abs() <= 1e-4 * ty, "{m:?}: {tx} {ty}");
            assert!(tx > 0.0 && tx <= sx.absmax());
        }
    }

    #[test]
    fn degenerate_tensors() {
        let s = stats_of(&[0.0; 10]);
        for m in [Method::Entropy, Method::MinMax, Method::Percentile(99.0)] {
            assert_eq!(m.threshold(&s), 0.0);
        }
        assert_eq!(percentile(&[], 99.0), 0);
        assert_eq!(entropy_bins(&[1; 64]), 64);
        assert_eq!(Method::parse("percentile", 0.0), None);
        assert_eq!(Method::parse("entropy", 0.0), Some(Method::Entropy));
    }
}
