//! Element-wise activations and unary math.
//!
//! One enum serves both as a stand-alone op and as the epilogue fused into
//! GEMM and convolution kernels, so a fused layer computes exactly what the
//! unfused pair would.

/// A unary element-wise function.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Activation {
    /// Identity.
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, lo), hi)`.
    Clip {
        /// Lower bound.
        lo: f32,
        /// Upper bound.
        hi: f32,
    },
    /// `x` if positive else `alpha * x`.
    LeakyRelu {
        /// Slope for negative inputs.
        alpha: f32,
    },
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// `max(0, min(1, alpha * x + beta))`.
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `x * max(0, min(1, x / 6 + 1/2))`.
    HardSwish,
    /// `(k * x) * min(max(x + 3, 0), 6)`: hard-swish with its scale written
    /// out, in that order (TensorFlow's MobileNetV3 exports multiply by an
    /// f16-rounded 1/6 first), so a fused layer computes exactly what the
    /// four unfused ops did.
    HardSwishScaled {
        /// The scale (about 1/6).
        k: f32,
    },
    /// `x * sigmoid(x)` (SiLU, swish).
    Silu,
    /// `exp(x)`.
    Exp,
    /// `sqrt(x)`.
    Sqrt,
    /// `x ^ p` for a constant exponent.
    Pow {
        /// Exponent.
        p: f32,
    },
    /// `-x`.
    Neg,
    /// `tanh(x)`.
    Tanh,
    /// `|x|`.
    Abs,
    /// `1 / x`.
    Reciprocal,
}

impl Activation {
    /// Applies the function to one value; this is the scalar reference.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::Relu => x.max(0.0),
            Activation::Clip { lo, hi } => x.max(lo).min(hi),
            Activation::LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha * x
                }
            }
            Activation::Sigmoid => sigmoid(x),
            Activation::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Activation::HardSwish => x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
            Activation::HardSwishScaled { k } => (k * x) * relu6(x + 3.0),
            Activation::Silu => x * sigmoid(x),
            Activation::Exp => x.exp(),
            Activation::Sqrt => x.sqrt(),
            Activation::Pow { p } => pow(x, p),
            Activation::Neg => -x,
            Activation::Tanh => x.tanh(),
            Activation::Abs => x.abs(),
            Activation::Reciprocal => 1.0 / x,
        }
    }

    /// Applies the function in place over a slice (vectorised; see
    /// [`Activation::apply_fast`]).
    pub fn apply_slice(self, xs: &mut [f32]) {
        if self == Activation::None {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let isa = crate::isa::active();
            if isa.has_avx512() {
                // SAFETY: the AVX-512 tier has AVX-512F, AVX2 and FMA.
                unsafe { apply_slice_avx512(self, xs) };
                return;
            }
            if isa.has_avx2() {
                // SAFETY: AVX2 and FMA are available on the AVX2 tiers.
                unsafe { apply_slice_avx2(self, xs) };
                return;
            }
        }
        apply_slice_body(self, xs);
    }

    /// Writes `f(src)` into `dst` (same length), in one pass.
    pub fn apply_into(self, src: &[f32], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let isa = crate::isa::active();
            if isa.has_avx512() {
                // SAFETY: the AVX-512 tier has AVX-512F, AVX2 and FMA.
                unsafe { apply_into_avx512(self, src, dst) };
                return;
            }
            if isa.has_avx2() {
                // SAFETY: AVX2 and FMA are available on the AVX2 tiers.
                unsafe { apply_into_avx2(self, src, dst) };
                return;
            }
        }
        apply_into_body(self, src, dst);
    }

    /// `dst = f(src)` split across the pool in 32k-element chunks.
    pub fn apply_parallel(self, pool: &crate::pool::ThreadPool, src: &[f32], dst: &mut [f32]) {
        const CHUNK: usize = 32 * 1024;
        let n = src.len().min(dst.len());
        if n <= CHUNK || pool.threads() == 1 {
            self.apply_into(&src[..n], &mut dst[..n]);
            return;
        }
        let d = crate::pool::SyncPtr::new(dst);
        pool.run(n.div_ceil(CHUNK), &|t, _| {
            let (lo, hi) = (t * CHUNK, ((t + 1) * CHUNK).min(n));
            // SAFETY: each task writes its own chunk of dst.
            let out = unsafe { std::slice::from_raw_parts_mut(d.add(lo), hi - lo) };
            self.apply_into(&src[lo..hi], out);
        });
    }

    /// The form used on slices: identical to [`Activation::apply`] except that
    /// `exp` (in Sigmoid, Exp, Tanh) is a branch-free polynomial that LLVM
    /// vectorises, accurate to about 2 ulp.
    #[inline(always)]
    pub fn apply_fast(self, x: f32) -> f32 {
        match self {
            Activation::Sigmoid => sigmoid_fast(x),
            Activation::Silu => x * sigmoid_fast(x),
            Activation::Exp => exp_fast(x),
            Activation::Tanh => tanh_fast(x),
            other => other.apply(x),
        }
    }
}

/// `min(max(v, 0), 6)` as ONNX Clip computes it (NaN becomes 0, where
/// `clamp` would keep it): the scaled hard-swish must equal the unfused
/// ops bit for bit.
#[inline(always)]
#[allow(clippy::manual_clamp)]
fn relu6(v: f32) -> f32 {
    v.max(0.0).min(6.0)
}

#[inline(always)]
fn apply_slice_body(act: Activation, xs: &mut [f32]) {
    match act {
        Activation::None => {}
        Activation::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::Clip { lo, hi } => xs.iter_mut().for_each(|x| *x = x.max(lo).min(hi)),
        Activation::HardSwish => xs
            .iter_mut()
            .for_each(|x| *x = *x * (*x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0)),
        Activation::HardSwishScaled { k } => {
            xs.iter_mut().for_each(|x| *x = (k * *x) * relu6(*x + 3.0))
        }
        Activation::HardSigmoid { alpha, beta } => xs
            .iter_mut()
            .for_each(|x| *x = (alpha * *x + beta).clamp(0.0, 1.0)),
        Activation::Sigmoid => xs.iter_mut().for_each(|x| *x = sigmoid_fast(*x)),
        Activation::Silu => xs.iter_mut().for_each(|x| *x = *x * sigmoid_fast(*x)),
        Activation::Exp => xs.iter_mut().for_each(|x| *x = exp_fast(*x)),
        Activation::Tanh => xs.iter_mut().for_each(|x| *x = tanh_fast(*x)),
        _ => xs.iter_mut().for_each(|x| *x = act.apply(*x)),
    }
}

#[inline(always)]
fn map_into(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = f(*s));
}

#[inline(always)]
fn apply_into_body(act: Activation, src: &[f32], dst: &mut [f32]) {
    match act {
        Activation::None => map_into(src, dst, |x| x),
        Activation::Relu => map_into(src, dst, |x| x.max(0.0)),
        Activation::Clip { lo, hi } => map_into(src, dst, |x| x.max(lo).min(hi)),
        Activation::HardSwish => {
            map_into(src, dst, |x| x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0))
        }
        Activation::HardSwishScaled { k } => map_into(src, dst, |x| (k * x) * relu6(x + 3.0)),
        Activation::HardSigmoid { alpha, beta } => {
            map_into(src, dst, |x| (alpha * x + beta).clamp(0.0, 1.0))
        }
        Activation::Sigmoid => map_into(src, dst, sigmoid_fast),
        Activation::Silu => map_into(src, dst, |x| x * sigmoid_fast(x)),
        Activation::Exp => map_into(src, dst, exp_fast),
        Activation::Tanh => map_into(src, dst, tanh_fast),
        _ => map_into(src, dst, |x| act.apply(x)),
    }
}

/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_slice_avx2(act: Activation, xs: &mut [f32]) {
    apply_slice_body(act, xs)
}

/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_into_avx2(act: Activation, src: &[f32], dst: &mut [f32]) {
    apply_into_body(act, src, dst)
}

/// The same loops 16 lanes wide (the same per-element operations, so the
/// same results as the AVX2 and scalar forms).
///
/// # Safety
/// AVX-512F, AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn apply_slice_avx512(act: Activation, xs: &mut [f32]) {
    apply_slice_body(act, xs)
}

/// # Safety
/// AVX-512F, AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn apply_into_avx512(act: Activation, src: &[f32], dst: &mut [f32]) {
    apply_into_body(act, src, dst)
}

#[inline(always)]
fn sigmoid_fast(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// tanh(x) = 1 − 2/(e^{2x} + 1), exact at the extremes.
#[inline(always)]
fn tanh_fast(x: f32) -> f32 {
    1.0 - 2.0 / (exp_fast(2.0 * x) + 1.0)
}

/// `e^x` without a libm call: `2^n · p(r)` with `x = n·ln2 + r`,
/// `|r| ≤ ln2/2`, `p` the degree-6 Taylor polynomial (error below 2e-7
/// relative). Inputs are clamped to the range of finite, normal results.
/// Rounding uses the 1.5·2²³ "magic number" so every step is a plain float
/// or integer lane operation and the loop vectorises.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
                                     // Branch-free clamp (also maps NaN to the lower bound).
    let x = if x > -87.0 { x } else { -87.0 };
    let x = if x < 88.0 { x } else { 88.0 };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC; // round(x·log2 e)
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    p * scale
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    // Written so that large |x| neither overflows nor loses the tail.
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[inline(always)]
fn pow(x: f32, p: f32) -> f32 {
    if p == 2.0 {
        x * x
    } else if p == 0.5 {
        x.sqrt()
    } else if p == 1.0 {
        x
    } else if p == 3.0 {
        x * x * x
    } else {
        x.powf(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        assert_eq!(Activation::Relu.apply(-1.0), 0.0);
        assert_eq!(Activation::Clip { lo: 0.0, hi: 6.0 }.apply(7.0), 6.0);
        assert_eq!(Activation::HardSwish.apply(-4.0), 0.0);
        assert_eq!(Activation::HardSwish.apply(4.0), 4.0);
        assert!((Activation::Sigmoid.apply(0.0) - 0.5).abs() < 1e-7);
        assert!(Activation::Sigmoid.apply(-200.0) >= 0.0);
        assert_eq!(Activation::Sigmoid.apply(200.0), 1.0);
        assert_eq!(Activation::Pow { p: 2.0 }.apply(-3.0), 9.0);
        assert_eq!(
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5
            }
            .apply(10.0),
            1.0
        );
    }

    #[test]
    fn exp_fast_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_fast(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.0));
    }

    #[test]
    fn fast_slices_match_reference() {
        let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.011).collect();
        for act in [
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Exp,
            Activation::HardSwish,
            Activation::HardSwishScaled { k: 0.16662598 },
        ] {
            let mut got = xs.clone();
            act.apply_slice(&mut got);
            for (x, g) in xs.iter().zip(&got) {
                let want = act.apply(*x);
                assert!(
                    (g - want).abs() <= 2e-6 * (1.0 + want.abs()),
                    "{act:?}({x}) = {g}, want {want}"
                );
            }
        }
    }

    /// The scaled hard-swish is the unfused ops' arithmetic in their
    /// order, in every path: equal bit for bit (NaN stays NaN: `max`
    /// ignores it the way ONNX Clip's `max` form does, then `k·x` keeps it).
    #[test]
    fn hardswish_scaled_is_the_unfused_ops_exactly() {
        let k = 0.16662598f32;
        let mut xs: Vec<f32> = (-900..900).map(|i| i as f32 * 0.0071).collect();
        xs.extend([-3.0, 3.0, 0.0, -0.0, 1e30, -1e30, f32::NAN]);
        let act = Activation::HardSwishScaled { k };
        let mut a = xs.clone();
        act.apply_slice(&mut a);
        let mut b = vec![0.0; xs.len()];
        act.apply_into(&xs, &mut b);
        for ((&x, &y), &z) in xs.iter().zip(&a).zip(&b) {
            #[allow(clippy::manual_clamp)]
            let clip = (x + 3.0).max(0.0).min(6.0);
            let want = (k * x) * clip;
            assert_eq!(y.to_bits(), want.to_bits(), "{x}");
            assert_eq!(z.to_bits(), want.to_bits(), "{x}");
            assert_eq!(act.apply(x).to_bits(), want.to_bits(), "{x}");
        }
    }

    #[test]
    fn slice_paths_match_scalar() {
        let xs: Vec<f32> = (-50..50).map(|i| i as f32 * 0.37).collect();
        for act in [
            Activation::Relu,
            Activation::Clip { lo: -1.0, hi: 2.0 },
            Activation::HardSwish,
            Activation::HardSwishScaled { k: 0.16662598 },
            Activation::Sigmoid,
        ] {
            let mut a = xs.clone();
            act.apply_slice(&mut a);
            let mut b = vec![0.0; xs.len()];
            act.apply_into(&xs, &mut b);
            for ((x, y), z) in xs.iter().zip(&a).zip(&b) {
                let want = act.apply(*x);
                assert!((y - want).abs() <= 2e-6 * (1.0 + want.abs()));
                assert_eq!(y, z);
            }
        }
    }
}
