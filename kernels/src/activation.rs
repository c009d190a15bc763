//! Element-wise activations and unary math.
//!
//! One enum serves both as a stand-alone op and as the epilogue fused into
//! GEMM and convolution kernels, so a fused layer computes exactly what the
//! unfused pair would.

/// A unary element-wise function.
#[derive(Clone, Copy, Debug, PartialEq)]
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
            Activation::Exp => x.exp(),
            Activation::Sqrt => x.sqrt(),
            Activation::Pow { p } => pow(x, p),
            Activation::Neg => -x,
            Activation::Tanh => x.tanh(),
            Activation::Abs => x.abs(),
            Activation::Reciprocal => 1.0 / x,
        }
    }

    /// Applies the function in place over a slice.
    pub fn apply_slice(self, xs: &mut [f32]) {
        match self {
            Activation::None => {}
            // Hot, simple cases get loops LLVM vectorises.
            Activation::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            Activation::Clip { lo, hi } => xs.iter_mut().for_each(|x| *x = x.max(lo).min(hi)),
            _ => xs.iter_mut().for_each(|x| *x = self.apply(*x)),
        }
    }

    /// Writes `f(src)` into `dst` (same length).
    pub fn apply_into(self, src: &[f32], dst: &mut [f32]) {
        match self {
            Activation::Relu => dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.max(0.0)),
            Activation::Clip { lo, hi } => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = s.max(lo).min(hi)),
            _ => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = self.apply(*s)),
        }
    }
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
    fn slice_paths_match_scalar() {
        let xs: Vec<f32> = (-50..50).map(|i| i as f32 * 0.37).collect();
        for act in [
            Activation::Relu,
            Activation::Clip { lo: -1.0, hi: 2.0 },
            Activation::HardSwish,
            Activation::Sigmoid,
        ] {
            let mut a = xs.clone();
            act.apply_slice(&mut a);
            let mut b = vec![0.0; xs.len()];
            act.apply_into(&xs, &mut b);
            for ((x, y), z) in xs.iter().zip(&a).zip(&b) {
                assert_eq!(*y, act.apply(*x));
                assert_eq!(*z, act.apply(*x));
            }
        }
    }
}
