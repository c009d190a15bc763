//! Resampling filters and their per-axis tap tables.
//!
//! Every filter is separable. The interpolating filters (TF-legacy
//! bilinear, half-pixel bilinear, nearest) use two taps per output sample
//! and are evaluated exactly as PREPROCESS.md writes them:
//! `top = TL + (TR − TL)·fx`, `v = top + (bottom − top)·fy`, in f32 on
//! unrounded pixel values. Pillow's antialiased bilinear uses a variable
//! number of fixed-point taps with a u8 intermediate, as Pillow does.

use serde::Deserialize;

/// Interpolation filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Pillow's `Image.resize(..., BILINEAR)`: antialiased triangle filter,
    /// fixed point (22 fractional bits), u8 intermediate. Bit-exact.
    PillowBilinear,
    /// TF1 / tf.js `resizeBilinear` defaults: `src = dst·in/out`, no
    /// half-pixel offset, no antialias.
    TfLegacyBilinear,
    /// Half-pixel-centre bilinear (cv2 INTER_LINEAR, torch
    /// `align_corners=False`, ONNX `half_pixel`), no antialias.
    Bilinear,
    /// Nearest neighbour at half-pixel centres: `src = floor((dst+0.5)·in/out)`.
    Nearest,
}

impl Filter {
    /// The name used in model description files.
    pub fn name(self) -> &'static str {
        match self {
            Filter::PillowBilinear => "pillow_bilinear",
            Filter::TfLegacyBilinear => "tf_legacy_bilinear",
            Filter::Bilinear => "bilinear",
            Filter::Nearest => "nearest",
        }
    }
}

/// Two-tap table for one axis: output `i` reads `i0[i]`, `i1[i]` with
/// fraction `f[i]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinearTaps {
    /// First source index per output sample.
    pub i0: Vec<u32>,
    /// Second source index per output sample.
    pub i1: Vec<u32>,
    /// Weight of the second tap.
    pub f: Vec<f32>,
}

impl LinearTaps {
    /// Taps mapping `n_in` source samples onto `n_out` outputs.
    pub fn new(filter: Filter, n_in: usize, n_out: usize) -> LinearTaps {
        let mut t = LinearTaps {
            i0: Vec::with_capacity(n_out),
            i1: Vec::with_capacity(n_out),
            f: Vec::with_capacity(n_out),
        };
        let scale = n_in as f64 / n_out as f64;
        let last = n_in.saturating_sub(1) as f64;
        for d in 0..n_out {
            let (a, b, f) = match filter {
                Filter::TfLegacyBilinear => {
                    let src = d as f64 * scale;
                    let i0 = src.floor().min(last);
                    let i1 = src.ceil().min(last);
                    (i0, i1, src - i0)
                }
                Filter::Bilinear => {
                    let src = (d as f64 + 0.5) * scale - 0.5;
                    let (mut i0, mut f) = (src.floor(), src - src.floor());
                    if i0 < 0.0 {
                        i0 = 0.0;
                        f = 0.0;
                    }
                    if i0 >= last {
                        i0 = last;
                        f = 0.0;
                    }
                    (i0, (i0 + 1.0).min(last), f)
                }
                Filter::Nearest | Filter::PillowBilinear => {
                    let i = ((d as f64 + 0.5) * scale).floor().min(last);
                    (i, i, 0.0)
                }
            };
            t.i0.push(a as u32);
            t.i1.push(b as u32);
            t.f.push(f as f32);
        }
        t
    }
}

/// Pillow's fixed-point precision (`PRECISION_BITS = 32 − 8 − 2`).
pub const PILLOW_BITS: u32 = 22;

/// Variable-width fixed-point taps for one axis (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PillowTaps {
    /// First source index per output sample.
    pub start: Vec<u32>,
    /// Number of taps per output sample.
    pub len: Vec<u32>,
    /// `width` coefficients per output sample (unused ones are 0).
    pub k: Vec<i32>,
    /// Coefficients per output sample in `k`.
    pub width: usize,
}

impl PillowTaps {
    /// Taps mapping `n_in` source samples onto `n_out` outputs.
    pub fn new(n_in: usize, n_out: usize) -> PillowTaps {
        let scale = n_in as f64 / n_out as f64;
        let fs = scale.max(1.0);
        let support = fs; // triangle support 1 × filterscale
        let width = (support * 2.0).ceil() as usize + 1;
        let mut t = PillowTaps {
            start: Vec::with_capacity(n_out),
            len: Vec::with_capacity(n_out),
            k: vec![0; n_out * width],
            width,
        };
        let ss = 1.0 / fs;
        let mut w = vec![0.0f64; width];
        for i in 0..n_out {
            let center = (i as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64).max(0) as usize;
            let n = xmax.saturating_sub(xmin).min(width);
            let mut sum = 0.0;
            for j in 0..n {
                let x = ((j + xmin) as f64 - center + 0.5) * ss;
                let v = if x.abs() < 1.0 { 1.0 - x.abs() } else { 0.0 };
                w[j] = v;
                sum += v;
            }
            for j in 0..n {
                let v = if sum != 0.0 { w[j] / sum } else { 0.0 };
                let fixed = v * (1u64 << PILLOW_BITS) as f64;
                t.k[i * width + j] = if v < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            t.start.push(xmin as u32);
            t.len.push(n as u32);
        }
        t
    }

    /// Applies output sample `i`'s taps to `src(j)` for `j` in its window:
    /// `clamp((2^21 + Σ k·src) >> 22, 0, 255)`.
    #[inline(always)]
    pub fn apply(&self, i: usize, src: impl Fn(usize) -> u8) -> u8 {
        let s = self.start[i] as usize;
        let k = &self.k[i * self.width..i * self.width + self.len[i] as usize];
        let mut acc: i32 = 1 << (PILLOW_BITS - 1);
        for (j, &kj) in k.iter().enumerate() {
            acc += kj * src(s + j) as i32;
        }
        (acc >> PILLOW_BITS).clamp(0, 255) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_legacy_taps_follow_the_formula() {
        // 768 → 512: src = d·1.5.
        let t = LinearTaps::new(Filter::TfLegacyBilinear, 768, 512);
        assert_eq!((t.i0[1], t.i1[1], t.f[1]), (1, 2, 0.5));
        assert_eq!((t.i0[2], t.i1[2], t.f[2]), (3, 3, 0.0));
        // Upscaling clamps the last taps to the last pixel.
        let u = LinearTaps::new(Filter::TfLegacyBilinear, 3, 8);
        assert_eq!((u.i0[7], u.i1[7]), (2, 2));
    }

    #[test]
    fn half_pixel_taps_clamp_at_both_ends() {
        let t = LinearTaps::new(Filter::Bilinear, 4, 8);
        assert_eq!((t.i0[0], t.i1[0], t.f[0]), (0, 1, 0.0));
        assert_eq!((t.i0[1], t.i1[1], t.f[1]), (0, 1, 0.25));
        assert_eq!((t.i0[7], t.i1[7], t.f[7]), (3, 3, 0.0));
    }

    #[test]
    fn pillow_taps_sum_to_one_in_fixed_point() {
        for (n_in, n_out) in [(768, 224), (224, 224), (100, 300), (1920, 224), (3, 2)] {
            let t = PillowTaps::new(n_in, n_out);
            for i in 0..n_out {
                let s: i64 = t.k[i * t.width..(i + 1) * t.width]
                    .iter()
                    .map(|&k| k as i64)
                    .sum();
                assert!(
                    (s - (1 << PILLOW_BITS)).abs() <= t.width as i64,
                    "{n_in}->{n_out} @{i}: {s}"
                );
                assert!(t.start[i] as usize + t.len[i] as usize <= n_in);
            }
            // A constant image stays constant.
            for i in 0..n_out {
                assert_eq!(t.apply(i, |_| 200), 200);
            }
        }
    }
}
