//! Token sampling: greedy, temperature, top-k, top-p (nucleus) and a
//! repetition penalty, with a seeded generator so runs are reproducible.

use super::LlmError;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this
    /// (1 = off), over the last `repeat_last_n` tokens.
    pub repetition_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: usize,
    /// Random seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), LlmError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(LlmError::Request(format!(
                "temperature {} must be ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(LlmError::Request(format!(
                "top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(LlmError::Request(format!(
                "repetition penalty {} must be > 0",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// A sampler with its own random state and scratch (no allocation per
/// token after the first).
#[derive(Debug)]
pub struct Sampler {
    /// The parameters.
    pub params: SamplingParams,
    state: u64,
    cand: Vec<(f32, u32)>,
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Sampler {
        let state = params.seed ^ 0x9e37_79b9_7f4a_7c15;
        Sampler {
            params,
            state,
            cand: Vec::new(),
        }
    }

    fn next_f32(&mut self) -> f32 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks the next token from `logits` (modified in place by the
    /// penalty), given the tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            for &t in &history[start..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        let (t, top_k, top_p) = (p.temperature, p.top_k, p.top_p);
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (l / t, i as u32)));
        let k = if top_k == 0 {
            self.cand.len()
        } else {
            top_k.min(self.cand.len())
        };
        let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, cmp);
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(cmp);
        let m = self.cand[0].0;
        let mut sum = 0.0f32;
        for c in self.cand.iter_mut() {
            c.0 = (c.0 - m).exp();
            sum += c.0;
        }
        // Nucleus: the smallest prefix reaching top_p.
        let mut keep = self.cand.len();
        if top_p < 1.0 {
            let mut acc = 0.0;
            for (i, c) in self.cand.iter().enumerate() {
                acc += c.0 / sum;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = self.cand[..keep].iter().map(|c| c.0).sum();
        let mut r = self.next_f32() * total;
        for c in &self.cand[..keep] {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.cand[keep - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = vec![0.1, 2.0, 1.9, -3.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
        // Same seed → same sequence; top-k 1 is greedy.
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        let picks = run(&p);
        assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
        assert!(run(&SamplingParams {
            top_k: 1,
            ..p.clone()
        })
        .iter()
        .all(|&t| t == 1));
        // top-p small keeps only the best.
        assert!(run(&SamplingParams {
            top_p: 0.01,
            ..p.clone()
        })
        .iter()
        .all(|&t| t == 1));
        // The penalty can flip greedy.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.2,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits.clone(), &[1]), 2);
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
