//! Per-tensor statistics over a calibration set, in two passes like
//! TensorRT's calibrators: the first finds each tensor's range, the second
//! fills a 2048-bin histogram of `|x|` over `[0, max|x|]`, so no sample
//! falls outside and no bin is re-split.

use std::collections::HashMap;

/// Bins of every histogram (TensorRT's choice).
pub const BINS: usize = 2048;

/// What was seen of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    /// Tensor name in the (optimised) graph.
    pub name: String,
    /// Smallest value.
    pub min: f32,
    /// Largest value.
    pub max: f32,
    /// Values seen (per pass).
    pub count: u64,
    /// Non-finite values seen (ignored by the statistics).
    pub non_finite: u64,
    /// Exact zeros seen in the histogram pass. They are kept out of
    /// `hist`: INT8 represents zero exactly at every scale, so they say
    /// nothing about the threshold, and a ReLU's spike of zeros would
    /// otherwise dominate the KL search (see `threshold`).
    pub zeros: u64,
    /// Histogram of `|x|` over `[0, absmax]`, [`BINS`] bins (empty until
    /// the second pass).
    pub hist: Vec<u64>,
}

impl TensorStats {
    fn new(name: &str) -> TensorStats {
        TensorStats {
            name: name.to_string(),
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            non_finite: 0,
            zeros: 0,
            hist: Vec::new(),
        }
    }

    /// `max(|min|, |max|)`; 0 for a tensor that held nothing finite.
    pub fn absmax(&self) -> f32 {
        if self.min > self.max {
            0.0
        } else {
            self.min.abs().max(self.max.abs())
        }
    }

    /// Width of one histogram bin.
    pub fn bin_width(&self) -> f32 {
        self.absmax() / BINS as f32
    }

    fn observe_range(&mut self, x: &[f32]) {
        let (mut lo, mut hi) = (self.min, self.max);
        for &v in x {
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
            } else {
                self.non_finite += 1;
            }
        }
        self.min = lo;
        self.max = hi;
        self.count += x.len() as u64;
    }

    fn observe_hist(&mut self, x: &[f32]) {
        if self.hist.len() != BINS {
            self.hist = vec![0; BINS];
        }
        let amax = self.absmax();
        if amax <= 0.0 {
            self.zeros += x.iter().filter(|v| **v == 0.0).count() as u64;
            return;
        }
        let scale = BINS as f32 / amax;
        for &v in x {
            if v == 0.0 {
                self.zeros += 1;
            } else if v.is_finite() {
                let b = ((v.abs() * scale) as usize).min(BINS - 1);
                self.hist[b] += 1;
            }
        }
    }
}

/// Which pass a [`Collector`] is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Ranges.
    Range,
    /// Histograms.
    Histogram,
}

/// Collects [`TensorStats`] for every tensor it is shown.
#[derive(Debug)]
pub struct Collector {
    pass: Pass,
    index: HashMap<String, usize>,
    stats: Vec<TensorStats>,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

impl Collector {
    /// An empty collector in the range pass.
    pub fn new() -> Collector {
        Collector {
            pass: Pass::Range,
            index: HashMap::new(),
            stats: Vec::new(),
        }
    }

    /// Switches to the histogram pass (run the same samples again).
    pub fn start_histograms(&mut self) {
        self.pass = Pass::Histogram;
    }

    /// The current pass.
    pub fn pass(&self) -> Pass {
        self.pass
    }

    /// Records one tensor's values.
    pub fn observe(&mut self, name: &str, x: &[f32]) {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                if self.pass == Pass::Histogram {
                    // Not seen in the range pass: nothing to bin against.
                    return;
                }
                self.stats.push(TensorStats::new(name));
                self.index.insert(name.to_string(), self.stats.len() - 1);
                self.stats.len() - 1
            }
        };
        match self.pass {
            Pass::Range => self.stats[i].observe_range(x),
            Pass::Histogram => self.stats[i].observe_hist(x),
        }
    }

    /// The statistics, in first-seen (execution) order.
    pub fn stats(&self) -> &[TensorStats] {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_passes_give_range_and_histogram() {
        let mut c = Collector::new();
        let a: Vec<f32> = (0..1000).map(|i| i as f32 / 100.0 - 4.0).collect();
        c.observe("a", &a);
        c.observe("b", &[f32::NAN, 1.0]);
        c.start_histograms();
        c.observe("a", &a);
        c.observe("b", &[f32::NAN, 1.0]);
        c.observe("unseen", &[1.0]);
        let s = &c.stats()[0];
        assert_eq!((s.min, s.max, s.absmax()), (-4.0, 5.99, 5.99));
        // 0.0 is counted apart; |x| = 5.99 lands in the last bin.
        assert_eq!(s.hist.iter().sum::<u64>() + s.zeros, 1000);
        assert_eq!(s.zeros, 1);
        assert_eq!(s.hist[BINS - 1], 1);
        let b = &c.stats()[1];
        assert_eq!((b.non_finite, b.absmax()), (1, 1.0));
        assert_eq!(c.stats().len(), 2);
    }
}
