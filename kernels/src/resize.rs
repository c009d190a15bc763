//! Spatial resize of NCHW planes with ONNX's coordinate conventions.
//!
//! Index and weight tables are computed once, when the layer is prepared.

use crate::pool::{SyncPtr, ThreadPool};

/// How an output coordinate maps back to the input (ONNX `coordinate_transformation_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum CoordMode {
    /// `(x + 0.5) / scale - 0.5`
    HalfPixel,
    /// Like half-pixel, but 0 when the output length is 1.
    PytorchHalfPixel,
    /// `x * (in - 1) / (out - 1)`
    AlignCorners,
    /// `x / scale`
    Asymmetric,
    /// `(x + 0.5) / scale`
    TfHalfPixelForNearest,
}

/// Rounding for nearest-neighbour resize (ONNX `nearest_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum NearestMode {
    /// Round, ties toward floor.
    RoundPreferFloor,
    /// Round, ties toward ceiling.
    RoundPreferCeil,
    /// Floor.
    Floor,
    /// Ceiling.
    Ceil,
}

/// Interpolation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ResizeMode {
    /// Nearest neighbour.
    Nearest(NearestMode),
    /// Bilinear.
    Linear,
}

/// One output position along an axis: two source indices and their weights.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

fn source_coord(mode: CoordMode, x: usize, scale: f32, len_in: usize, len_out: usize) -> f32 {
    let x = x as f32;
    match mode {
        CoordMode::HalfPixel => (x + 0.5) / scale - 0.5,
        CoordMode::PytorchHalfPixel => {
            if len_out > 1 {
                (x + 0.5) / scale - 0.5
            } else {
                0.0
            }
        }
        CoordMode::AlignCorners => {
            if len_out == 1 {
                0.0
            } else {
                x * (len_in as f32 - 1.0) / (len_out as f32 - 1.0)
            }
        }
        CoordMode::Asymmetric => x / scale,
        CoordMode::TfHalfPixelForNearest => (x + 0.5) / scale,
    }
}

fn axis_taps(
    mode: ResizeMode,
    coord: CoordMode,
    len_in: usize,
    len_out: usize,
    scale: f32,
) -> Vec<Tap> {
    let last = len_in.saturating_sub(1);
    (0..len_out)
        .map(|o| {
            let s = source_coord(coord, o, scale, len_in, len_out);
            match mode {
                ResizeMode::Nearest(nm) => {
                    let r = match nm {
                        NearestMode::RoundPreferFloor => {
                            if s == s.floor() + 0.5 {
                                s.floor()
                            } else {
                                s.round()
                            }
                        }
                        NearestMode::RoundPreferCeil => (s + 0.5).floor(),
                        NearestMode::Floor => s.floor(),
                        NearestMode::Ceil => s.ceil(),
                    };
                    let i = (r.max(0.0) as usize).min(last);
                    Tap {
                        i0: i,
                        i1: i,
                        w0: 1.0,
                        w1: 0.0,
                    }
                }
                ResizeMode::Linear => {
                    let s = s.clamp(0.0, last as f32);
                    let i0 = (s as usize).min(last);
                    let i1 = (i0 + 1).min(last);
                    if i0 == i1 {
                        Tap {
                            i0,
                            i1,
                            w0: 0.5,
                            w1: 0.5,
                        }
                    } else {
                        let d0 = s - i0 as f32;
                        Tap {
                            i0,
                            i1,
                            w0: 1.0 - d0,
                            w1: d0,
                        }
                    }
                }
            }
        })
        .collect()
}

/// One bilinear output from the four taps (row 0 left, right; row 1 left,
/// right): the single formula both layouts use, so they agree bit for bit.
#[inline(always)]
fn bilinear(v: [f32; 4], tx: &Tap, ty: &Tap) -> f32 {
    v[0] * tx.w0 * ty.w0 + v[1] * tx.w1 * ty.w0 + v[2] * tx.w0 * ty.w1 + v[3] * tx.w1 * ty.w1
}

/// [`bilinear`] over one channels-last pixel's channels: `o[k]` from the
/// four taps' `k`-th values.
#[inline(always)]
fn bilinear_run(o: &mut [f32], taps: [&[f32]; 4], tx: &Tap, ty: &Tap) {
    let [a0, a1, b0, b1] = taps;
    for ((((v, &p), &q), &r), &s) in o.iter_mut().zip(a0).zip(a1).zip(b0).zip(b1) {
        *v = bilinear([p, q, r, s], tx, ty);
    }
}

/// [`bilinear_run`] compiled for AVX2, so the channel loop runs eight
/// lanes at a time (the same operations in the same order: identical
/// results).
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bilinear_run_avx2(o: &mut [f32], taps: [&[f32]; 4], tx: &Tap, ty: &Tap) {
    bilinear_run(o, taps, tx, ty)
}

/// A prepared 2-D resize of `planes` planes `h×w → oh×ow`.
#[derive(Clone, Debug)]
pub struct Resize2d {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    ys: Vec<Tap>,
    xs: Vec<Tap>,
    nearest: bool,
}

impl Resize2d {
    /// Prepares the tables. `scale_y`/`scale_x` are output/input ratios as ONNX
    /// defines them (given, or derived from sizes).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        planes: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        (scale_y, scale_x): (f32, f32),
        mode: ResizeMode,
        coord: CoordMode,
    ) -> Resize2d {
        Resize2d {
            planes,
            h,
            w,
            oh,
            ow,
            ys: axis_taps(mode, coord, h, oh, scale_y),
            xs: axis_taps(mode, coord, w, ow, scale_x),
            nearest: matches!(mode, ResizeMode::Nearest(_)),
        }
    }

    /// Resizes every plane; parallel over planes.
    pub fn run(&self, pool: &ThreadPool, x: &[f32], y: &mut [f32]) {
        let (h, w, oh, ow) = (self.h, self.w, self.oh, self.ow);
        assert!(x.len() >= self.planes * h * w && y.len() >= self.planes * oh * ow);
        if h == 0 || w == 0 {
            return;
        }
        let y_ptr = SyncPtr::new(y);
        let task = |p: usize, _slot: usize| {
            let xp = &x[p * h * w..(p + 1) * h * w];
            // SAFETY: plane p is written by this task alone.
            let yp = unsafe { std::slice::from_raw_parts_mut(y_ptr.add(p * oh * ow), oh * ow) };
            for (oy, ty) in self.ys.iter().enumerate() {
                let r0 = &xp[ty.i0 * w..(ty.i0 + 1) * w];
                let r1 = &xp[ty.i1 * w..(ty.i1 + 1) * w];
                let out = &mut yp[oy * ow..(oy + 1) * ow];
                if self.nearest {
                    // Exact copies: no arithmetic, so Inf/NaN pass through unchanged.
                    for (o, tx) in out.iter_mut().zip(&self.xs) {
                        *o = r0[tx.i0];
                    }
                    continue;
                }
                for (o, tx) in out.iter_mut().zip(&self.xs) {
                    *o = bilinear([r0[tx.i0], r0[tx.i1], r1[tx.i0], r1[tx.i1]], tx, ty);
                }
            }
        };
        pool.run(self.planes, &task);
    }

    /// Resizes channels-last images: `x` is `[n, h, w, channels]`, `y`
    /// `[n, oh, ow, channels]`, with `n · channels` the planes this resize
    /// was prepared for. The arithmetic is [`Resize2d::run`]'s, term for
    /// term, so results are identical; parallel over output rows.
    pub fn run_channels_last(&self, pool: &ThreadPool, channels: usize, x: &[f32], y: &mut [f32]) {
        let (h, w, oh, ow, c) = (self.h, self.w, self.oh, self.ow, channels);
        assert!(
            c > 0 && self.planes.is_multiple_of(c),
            "resize: channels do not divide the planes"
        );
        let n = self.planes / c;
        assert!(x.len() >= n * h * w * c && y.len() >= n * oh * ow * c);
        if h == 0 || w == 0 {
            return;
        }
        let row = ow * c;
        let y_ptr = SyncPtr::new(y);
        #[cfg(target_arch = "x86_64")]
        let avx2 = crate::isa::active().has_avx2();
        let task = |t: usize, _slot: usize| {
            let (b, oy) = (t / oh, t % oh);
            let ty = self.ys[oy];
            let xb = &x[b * h * w * c..(b + 1) * h * w * c];
            let r0 = &xb[ty.i0 * w * c..(ty.i0 + 1) * w * c];
            let r1 = &xb[ty.i1 * w * c..(ty.i1 + 1) * w * c];
            // SAFETY: output row (b, oy) is written by this task alone.
            let out = unsafe { std::slice::from_raw_parts_mut(y_ptr.add(t * row), row) };
            for (o, tx) in out.chunks_exact_mut(c).zip(&self.xs) {
                let a0 = &r0[tx.i0 * c..(tx.i0 + 1) * c];
                if self.nearest {
                    o.copy_from_slice(a0);
                    continue;
                }
                let a1 = &r0[tx.i1 * c..(tx.i1 + 1) * c];
                let b0 = &r1[tx.i0 * c..(tx.i0 + 1) * c];
                let b1 = &r1[tx.i1 * c..(tx.i1 + 1) * c];
                let taps = [a0, a1, b0, b1];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 is present (checked above).
                    unsafe { bilinear_run_avx2(o, taps, tx, &ty) };
                    continue;
                }
                bilinear_run(o, taps, tx, &ty);
            }
        };
        pool.run(n * oh, &task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_asymmetric_floor_doubles() {
        let r = Resize2d::new(
            1,
            (2, 2),
            (4, 4),
            (2.0, 2.0),
            ResizeMode::Nearest(NearestMode::Floor),
            CoordMode::Asymmetric,
        );
        let mut y = vec![0.0; 16];
        r.run(&ThreadPool::new(1), &[1.0, 2.0, 3.0, 4.0], &mut y);
        assert_eq!(
            y,
            vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
        );
    }

    #[test]
    fn linear_asymmetric_matches_formula() {
        // ONNX reference: x_orig = x / 2, clamped to the last pixel.
        let r = Resize2d::new(
            1,
            (1, 3),
            (1, 6),
            (1.0, 2.0),
            ResizeMode::Linear,
            CoordMode::Asymmetric,
        );
        let mut y = vec![0.0; 6];
        r.run(&ThreadPool::new(1), &[0.0, 10.0, 20.0], &mut y);
        assert_eq!(y, vec![0.0, 5.0, 10.0, 15.0, 20.0, 20.0]);
    }

    #[test]
    fn linear_half_pixel_and_align_corners() {
        let r = Resize2d::new(
            1,
            (1, 2),
            (1, 4),
            (1.0, 2.0),
            ResizeMode::Linear,
            CoordMode::HalfPixel,
        );
        let mut y = vec![0.0; 4];
        r.run(&ThreadPool::new(1), &[0.0, 4.0], &mut y);
        assert_eq!(y, vec![0.0, 1.0, 3.0, 4.0]);
        let r = Resize2d::new(
            1,
            (1, 2),
            (1, 3),
            (1.0, 1.5),
            ResizeMode::Linear,
            CoordMode::AlignCorners,
        );
        let mut y = vec![0.0; 3];
        r.run(&ThreadPool::new(1), &[0.0, 4.0], &mut y);
        assert_eq!(y, vec![0.0, 2.0, 4.0]);
    }

    #[test]
    fn nearest_rounding_modes() {
        let taps = axis_taps(
            ResizeMode::Nearest(NearestMode::RoundPreferFloor),
            CoordMode::Asymmetric,
            4,
            8,
            2.0,
        );
        let idx: Vec<usize> = taps.iter().map(|t| t.i0).collect();
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 2, 3, 3]);
        let taps = axis_taps(
            ResizeMode::Nearest(NearestMode::RoundPreferCeil),
            CoordMode::Asymmetric,
            4,
            8,
            2.0,
        );
        let idx: Vec<usize> = taps.iter().map(|t| t.i0).collect();
        assert_eq!(idx, vec![0, 1, 1, 2, 2, 3, 3, 3]);
    }

    #[test]
    fn channels_last_gives_the_same_values() {
        // 5 channels: the scalar tail only; 21: vectors and a tail.
        for c in [5, 21] {
            channels_last_matches_planes(c);
        }
    }

    fn channels_last_matches_planes(c: usize) {
        let (n, h, w) = (2, 4, 6);
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37) % 101) as f32 / 7.0)
            .collect();
        let pool = ThreadPool::new(3);
        for mode in [ResizeMode::Linear, ResizeMode::Nearest(NearestMode::Floor)] {
            let r = Resize2d::new(
                n * c,
                (h, w),
                (7, 9),
                (1.75, 1.5),
                mode,
                CoordMode::HalfPixel,
            );
            let mut y = vec![0.0; n * c * 63];
            r.run(&pool, &x, &mut y);
            // NCHW → NHWC, resize, and compare element by element.
            let mut xl = vec![0.0; x.len()];
            for b in 0..n {
                for ch in 0..c {
                    for p in 0..h * w {
                        xl[(b * h * w + p) * c + ch] = x[(b * c + ch) * h * w + p];
                    }
                }
            }
            let mut yl = vec![0.0; y.len()];
            r.run_channels_last(&pool, c, &xl, &mut yl);
            for b in 0..n {
                for ch in 0..c {
                    for p in 0..63 {
                        assert_eq!(yl[(b * 63 + p) * c + ch], y[(b * c + ch) * 63 + p]);
                    }
                }
            }
        }
    }
}
