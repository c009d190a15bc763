//! 2-D convolution in the channels-last layout (NHWC, f32).
//!
//! The engine's layout pass (`osprey_engine::passes::channels_last`) may run a model's
//! convolutions channels-last, with the layout conversions at the graph's
//! boundary. In NHWC every pixel's channels are contiguous, which gives two
//! kernels without any copy of the input (a submodule each; this module
//! prepares the weights and dispatches):
//!
//! * **gemm** (groups 1, any kernel, stride, dilation, padding): the output
//!   `[pixels, c_out]` is an implicit-im2col GEMM whose A rows are the
//!   pixels' receptive fields. For one tap, a pixel's A row segment is simply
//!   the `c_in` contiguous input values at the tapped position (or a row of
//!   zeros in the padding), so the micro-kernel reads A straight from the
//!   input. Weights are packed once into panels of 16 output channels; the
//!   AVX2 micro-kernel holds 6 pixels × 16 channels in registers. Bias,
//!   residual and Relu/Clip are applied before the single store.
//! * **depthwise** (one input channel per group, multiplier 1): each output
//!   pixel's channels are one contiguous vector sum over the valid taps,
//!   vectorised across channels — no padded plane, no row de-interleaving.
//!
//! The scalar reference is [`crate::conv::reference_conv2d`] on transposed
//! data (see the tests).

use crate::activation::Activation;
use crate::conv::Conv2dGeometry;
use crate::error::KernelError;
use crate::isa;
use crate::pool::{SyncPtr, ThreadPool};

mod depthwise;
pub(crate) mod fused;
mod gemm;

pub use depthwise::DwElem;
use depthwise::{RowOut, DW_GROUP};
pub use fused::DwOut;

/// Pixels per micro-tile (AVX2 and portable: 6 pixels × 16 channels in
/// 12 of the 16 ymm registers).
const MR: usize = 6;
/// Pixels per micro-tile with AVX-512: 12 pixels × 32 channels (two
/// panels) in 24 of the 32 zmm registers.
const MR512: usize = 12;
/// Pixels per AVX-512 micro-tile of a long pointwise reduction: 14 × 32
/// channels in 28 zmm registers, two for the weights, one broadcast.
/// In-process A/B against 12 rows (1 thread, median of 30 rounds):
/// 672->112 at 14² 0.95, 1152->192 at 7² 0.89, 192->1152 at 7² 0.94,
/// 240->40 at 28² 0.93; reductions of 144 or fewer even or slower (up to
/// 1.04), hence [`LONG_REDUCTION`].
const MR512_LONG: usize = 14;
/// Shortest reduction that takes [`MR512_LONG`] tiles.
const LONG_REDUCTION: usize = 192;
/// Output channels per weight panel.
const NR: usize = 16;
/// Most taps a layer may have (pointer table on the stack).
pub const MAX_TAPS: usize = 64;

#[derive(Clone, Debug)]
enum Algo {
    /// Weights in panels of [`NR`] output channels: element
    /// `(t·c_in + ci, j)` of panel `p` at `p·K·NR + (t·c_in + ci)·NR + j`.
    Gemm { panels: Vec<f32>, k: usize },
    /// Weights `[tap][channel]`.
    Depthwise { w: Vec<f32> },
}

/// A prepared channels-last convolution.
#[derive(Clone, Debug)]
pub struct Conv2dNhwc {
    g: Conv2dGeometry,
    oh: usize,
    ow: usize,
    algo: Algo,
    /// Per output channel, padded with zeros to whole panels.
    bias: Vec<f32>,
    /// `c_in` zeros: the A row of a tap in the padding.
    zeros: Vec<f32>,
    act: Activation,
}

impl Conv2dNhwc {
    /// True when this module implements `g` (groups 1, or depthwise with
    /// multiplier 1; at most [`MAX_TAPS`] taps).
    pub fn supports(g: &Conv2dGeometry) -> bool {
        (g.groups == 1 || g.is_depthwise()) && g.kh * g.kw <= MAX_TAPS && g.kh * g.kw > 0
    }

    /// Prepares a layer; `weights` is `[c_out, c_in/groups, kh, kw]` (ONNX order).
    pub fn new(
        g: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
    ) -> Result<Conv2dNhwc, KernelError> {
        if !Conv2dNhwc::supports(&g) {
            return Err(KernelError::Unsupported {
                kernel: "conv2d-nhwc",
                detail: format!(
                    "groups {} with {} -> {} channels, {}x{} kernel (channels-last runs groups 1 or depthwise, at most {MAX_TAPS} taps)",
                    g.groups, g.c_in, g.c_out, g.kh, g.kw
                ),
            });
        }
        let (oh, ow) = g.validate("conv2d-nhwc")?;
        let mut bias =
            g.checked_bias(["conv2d-nhwc weights", "conv2d-nhwc bias"], weights, bias)?;
        let taps = g.kh * g.kw;
        // The depthwise algorithm exactly when `writes_i8_for(&g)`.
        let algo = if g.groups == 1 {
            let k = taps * g.c_in;
            let n_panels = g.c_out.div_ceil(NR);
            let mut panels = vec![0.0f32; n_panels * k * NR];
            for co in 0..g.c_out {
                let (p, j) = (co / NR, co % NR);
                for ci in 0..g.c_in {
                    for t in 0..taps {
                        panels[p * k * NR + (t * g.c_in + ci) * NR + j] =
                            weights[(co * g.c_in + ci) * taps + t];
                    }
                }
            }
            // Whole pairs of panels: the AVX-512 tile reads two at a time.
            bias.resize(n_panels.next_multiple_of(2) * NR, 0.0);
            Algo::Gemm { panels, k }
        } else {
            let c = g.c_out;
            let mut w = vec![0.0f32; taps * c];
            for ch in 0..c {
                for t in 0..taps {
                    w[t * c + ch] = weights[ch * taps + t];
                }
            }
            Algo::Depthwise { w }
        };
        Ok(Conv2dNhwc {
            g,
            oh,
            ow,
            algo,
            bias,
            zeros: vec![0.0; g.c_in],
            act,
        })
    }

    /// The geometry.
    pub fn geometry(&self) -> &Conv2dGeometry {
        &self.g
    }

    /// Output (height, width).
    pub fn out_hw(&self) -> (usize, usize) {
        (self.oh, self.ow)
    }

    /// Name of the algorithm in use (for reports).
    pub fn algorithm(&self) -> &'static str {
        match self.algo {
            Algo::Gemm { .. } => "nhwc-gemm",
            Algo::Depthwise { .. } => "nhwc-depthwise",
        }
    }

    /// Whether [`Conv2dNhwc::run_to_i8`] runs this layer (the depthwise
    /// algorithm).
    pub fn writes_i8(&self) -> bool {
        matches!(self.algo, Algo::Depthwise { .. })
    }

    /// Whether [`Conv2dNhwc::run_from_i8`] runs this layer (the depthwise
    /// algorithm reads INT8 input).
    pub fn reads_i8(&self) -> bool {
        self.is_depthwise()
    }

    /// Whether this layer is depthwise: it can read rows an expansion
    /// computes as it needs them ([`Conv2dNhwc::run_expand_depthwise`],
    /// [`crate::qconv_nhwc::QConv2dNhwc::run_expand_depthwise`]).
    pub fn is_depthwise(&self) -> bool {
        matches!(self.algo, Algo::Depthwise { .. })
    }

    /// [`Conv2dNhwc::writes_i8`] of the layer [`Conv2dNhwc::new`] would
    /// prepare for `g`, without preparing it (the planner asks before any
    /// weights are packed).
    pub fn writes_i8_for(g: &Conv2dGeometry) -> bool {
        Conv2dNhwc::supports(g) && g.groups != 1
    }

    /// Scratch floats [`Conv2dNhwc::run_to_i8`] needs: one group of
    /// neighbouring output pixels ([`DW_GROUP`]) per thread.
    pub fn scratch_len_i8(&self, threads: usize) -> usize {
        DW_GROUP * self.g.c_out * threads.max(1)
    }

    /// A depthwise layer whose output is read only by INT8 layers: each
    /// group of neighbouring output pixels is computed in f32 as
    /// [`Conv2dNhwc::run`] computes it, then requantized with `out_scale`
    /// (as the INT8 kernels' epilogue requantizes: `round(v / out_scale)`
    /// clamped to ±127) while it is in L1, so the f32 tensor never goes to
    /// memory (nor a whole f32 row to L2) and the reader does not quantize
    /// it again. The input may be INT8 as [`Conv2dNhwc::run_from_i8`]
    /// reads it.
    ///
    /// # Panics
    /// If the layer is not depthwise ([`Conv2dNhwc::writes_i8`]) or a
    /// buffer is shorter than the geometry needs.
    #[allow(clippy::too_many_arguments)]
    pub fn run_to_i8<T: DwElem>(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[T],
        residual: Option<&[f32]>,
        output: &mut [i8],
        out_scale: f32,
        scratch: &mut [f32],
    ) {
        let Algo::Depthwise { w } = &self.algo else {
            panic!("run_to_i8 needs a depthwise layer");
        };
        let g = &self.g;
        let in_img = g.h * g.w * g.c_in;
        let row_len = self.ow * g.c_out;
        let out_img = self.oh * row_len;
        let group = DW_GROUP * g.c_out;
        assert!(input.len() >= batch * in_img && output.len() >= batch * out_img);
        assert!(residual.is_none_or(|r| r.len() >= batch * out_img));
        assert!(scratch.len() >= self.scratch_len_i8(pool.threads()));
        let isa = isa::active();
        let inv = 1.0 / out_scale;
        let y_ptr = SyncPtr::new(output);
        let s_ptr = SyncPtr::new(scratch);
        for b in 0..batch {
            let x = &input[b * in_img..(b + 1) * in_img];
            let res = residual.map(|r| &r[b * out_img..(b + 1) * out_img]);
            pool.run(self.oh, &|oy, slot| {
                // SAFETY: thread slot `slot` alone uses its group of scratch
                // (sized for the pool's threads above); task `oy` alone
                // writes output row `oy` of image `b`, inside `output` by the
                // assert above.
                let (buf, y) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(s_ptr.add(slot * group), group),
                        std::slice::from_raw_parts_mut(
                            y_ptr.add(b * out_img + oy * row_len),
                            row_len,
                        ),
                    )
                };
                let rr = res.map(|r| &r[oy * row_len..(oy + 1) * row_len]);
                self.depthwise_row(isa, x, w, oy, rr, RowOut::I8 { buf, y, inv }, None);
            });
        }
    }

    /// A depthwise layer reading an INT8 tensor: each value is used as the
    /// float it is, so the caller prepares the layer with its weights
    /// times the input's scale (`x·s ∗ w = x ∗ (w·s)`, and the zero
    /// padding stays zero). The tensor is a quarter of the f32 one's
    /// bytes, and the math and the output are f32 as in
    /// [`Conv2dNhwc::run`] (which this equals, bit for bit, on the input
    /// converted to f32).
    ///
    /// # Panics
    /// If the layer is not depthwise ([`Conv2dNhwc::writes_i8`]) or a
    /// buffer is shorter than the geometry needs.
    pub fn run_from_i8(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[i8],
        residual: Option<&[f32]>,
        output: &mut [f32],
    ) {
        let Algo::Depthwise { w } = &self.algo else {
            panic!("run_from_i8 needs a depthwise layer");
        };
        let g = &self.g;
        let in_img = g.h * g.w * g.c_in;
        let out_img = self.oh * self.ow * g.c_out;
        assert!(input.len() >= batch * in_img && output.len() >= batch * out_img);
        assert!(residual.is_none_or(|r| r.len() >= batch * out_img));
        let isa = isa::active();
        for b in 0..batch {
            let x = &input[b * in_img..(b + 1) * in_img];
            let res = residual.map(|r| &r[b * out_img..(b + 1) * out_img]);
            let y = &mut output[b * out_img..(b + 1) * out_img];
            self.run_depthwise(pool, isa, x, res, y, w);
        }
    }

    /// Runs `batch` images: `input` is `[batch, h, w, c_in]`, `output`
    /// `[batch, oh, ow, c_out]`, and `residual` (added before the
    /// activation: a fused `Conv → Add`) has the output's shape.
    ///
    /// # Panics
    /// If a buffer is shorter than the geometry needs (the engine checks
    /// shapes when it plans memory).
    pub fn run(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[f32],
        residual: Option<&[f32]>,
        output: &mut [f32],
    ) {
        let g = &self.g;
        let in_img = g.h * g.w * g.c_in;
        let out_img = self.oh * self.ow * g.c_out;
        assert!(input.len() >= batch * in_img && output.len() >= batch * out_img);
        assert!(residual.is_none_or(|r| r.len() >= batch * out_img));
        let isa = isa::active();
        for b in 0..batch {
            let x = &input[b * in_img..(b + 1) * in_img];
            let res = residual.map(|r| &r[b * out_img..(b + 1) * out_img]);
            let y = &mut output[b * out_img..(b + 1) * out_img];
            match &self.algo {
                // Long pointwise reductions: 14-row tiles (28 of the 32
                // registers accumulate). Two more FMAs per weight pair,
                // and 14² and 7² maps fill whole tiles.
                Algo::Gemm { panels, k } if isa.has_avx512() && self.long_pointwise(*k) => {
                    self.run_gemm::<MR512_LONG, 2>(pool, isa, x, res, y, panels, *k)
                }
                Algo::Gemm { panels, k } if isa.has_avx512() => {
                    self.run_gemm::<MR512, 2>(pool, isa, x, res, y, panels, *k)
                }
                Algo::Gemm { panels, k } => {
                    self.run_gemm::<MR, 1>(pool, isa, x, res, y, panels, *k)
                }
                Algo::Depthwise { w } => self.run_depthwise(pool, isa, x, res, y, w),
            }
        }
    }

    /// A 1×1 stride-1 unpadded layer reducing over at least
    /// [`LONG_REDUCTION`] input channels (`k`).
    fn long_pointwise(&self, k: usize) -> bool {
        let g = &self.g;
        g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.pads == [0; 4] && k >= LONG_REDUCTION
    }

    /// Whether every column of output column `ox`'s window lies inside the
    /// input's width (no padding on either side).
    #[inline(always)]
    fn interior_col(&self, ox: usize) -> bool {
        let g = &self.g;
        let (sx, pl, span) = (g.stride[1], g.pads[1], (g.kw - 1) * g.dilation[1]);
        ox * sx >= pl && ox * sx - pl + span < g.w
    }

    /// Input offset of tap `(ky, kx)` for output pixel `(oy, ox)`, in
    /// pixels, or `None` in the padding.
    #[inline(always)]
    fn tap_pixel(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
        let g = &self.g;
        let iy = (oy * g.stride[0] + ky * g.dilation[0]).checked_sub(g.pads[0])?;
        let ix = (ox * g.stride[1] + kx * g.dilation[1]).checked_sub(g.pads[1])?;
        (iy < g.h && ix < g.w).then_some(iy * g.w + ix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::reference_conv2d;
    use proptest::prelude::*;

    use crate::conv::tests::data;

    /// NCHW → NHWC of one image.
    fn to_nhwc(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for ch in 0..c {
            for p in 0..hw {
                y[p * c + ch] = x[ch * hw + p];
            }
        }
        y
    }

    /// Runs one case against the reference; returns the largest error.
    fn check(g: Conv2dGeometry, act: Activation, residual: bool, threads: usize) -> f32 {
        let (oh, ow) = (g.out_h().unwrap(), g.out_w().unwrap());
        let batch = 2;
        let x = data(batch * g.c_in * g.h * g.w, 1);
        let w = data(g.c_out * g.c_in / g.groups * g.kh * g.kw, 2);
        let b = data(g.c_out, 3);
        let r = data(batch * g.c_out * oh * ow, 4);
        let layer = Conv2dNhwc::new(g, &w, Some(&b), act).unwrap();
        let (in_img, out_img) = (g.c_in * g.h * g.w, g.c_out * oh * ow);
        let mut xn = Vec::new();
        let mut rn = Vec::new();
        let mut want = Vec::new();
        for i in 0..batch {
            let xi = &x[i * in_img..(i + 1) * in_img];
            xn.extend(to_nhwc(xi, g.c_in, g.h * g.w));
            let ri = &r[i * out_img..(i + 1) * out_img];
            rn.extend(to_nhwc(ri, g.c_out, oh * ow));
            let mut yi = vec![0.0; out_img];
            reference_conv2d(&g, xi, &w, Some(&b), Activation::None, &mut yi);
            if residual {
                yi.iter_mut().zip(ri).for_each(|(v, r)| *v += r);
            }
            yi.iter_mut().for_each(|v| *v = act.apply(*v));
            want.extend(to_nhwc(&yi, g.c_out, oh * ow));
        }
        let mut y = vec![f32::NAN; batch * out_img];
        let pool = ThreadPool::new(threads);
        layer.run(&pool, batch, &xn, residual.then_some(&rn[..]), &mut y);
        // An output never written stays NaN, which `f32::max` would skip.
        y.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .map(|e| if e.is_nan() { f32::INFINITY } else { e })
            .fold(0.0, f32::max)
    }

    fn geo(
        c_in: usize,
        c_out: usize,
        hw: usize,
        k: usize,
        s: usize,
        pad: usize,
        groups: usize,
    ) -> Conv2dGeometry {
        Conv2dGeometry {
            c_in,
            h: hw,
            w: hw + 1,
            c_out,
            kh: k,
            kw: k,
            stride: [s, s],
            dilation: [1, 1],
            pads: [pad, pad, pad, pad],
            groups,
        }
    }

    /// Two images through depthwise layers of each `(c, hw, k, stride,
    /// pad)` with each `(activation, residual)`: `check(layer, residual,
    /// pool, threads)` on pools of 1 and 3 threads (weights `data · w_amp`,
    /// the residual output-shaped).
    fn each_depthwise(
        cases: &[(usize, usize, usize, usize, usize)],
        acts: &[(Activation, bool)],
        w_amp: f32,
        mut check: impl FnMut(&Conv2dNhwc, Option<&[f32]>, &ThreadPool, usize),
    ) {
        for &(c, hw, k, s, p) in cases {
            for &(act, residual) in acts {
                let g = geo(c, c, hw, k, s, p, c);
                let (oh, ow) = (g.out_h().unwrap(), g.out_w().unwrap());
                let w: Vec<f32> = data(c * k * k, 6).iter().map(|v| v * w_amp).collect();
                let r = data(2 * c * oh * ow, 8);
                let layer = Conv2dNhwc::new(g, &w, Some(&data(c, 7)), act).unwrap();
                for threads in [1, 3] {
                    let pool = ThreadPool::new(threads);
                    check(&layer, residual.then_some(&r[..]), &pool, threads);
                }
            }
        }
    }

    /// A depthwise layer writing INT8 equals its f32 run quantized after
    /// (the INT8 kernels' requantization), bit for bit, on every thread
    /// count; the f32 tensor is never written.
    #[test]
    fn depthwise_to_i8_is_the_f32_run_quantized() {
        let cases = [
            (24, 13, 3, 1, 1),
            (40, 14, 5, 2, 2),
            (13, 6, 3, 2, 0),
            (100, 6, 3, 1, 1),
        ];
        let acts = [
            (Activation::Clip { lo: 0.0, hi: 6.0 }, false),
            (Activation::None, true),
            (Activation::Silu, false),
        ];
        each_depthwise(&cases, &acts, 1.0, |layer, res, pool, threads| {
            let g = *layer.geometry();
            assert!(layer.writes_i8() && layer.reads_i8() && Conv2dNhwc::writes_i8_for(&g));
            let batch = 2;
            let x = data(batch * g.c_in * g.h * g.w, 5);
            let (oh, ow) = layer.out_hw();
            let out_scale = 0.013f32;
            let mut y = vec![0.0; batch * g.c_out * oh * ow];
            layer.run(pool, batch, &x, res, &mut y);
            let mut want = vec![0i8; y.len()];
            crate::int8::quantize_to_i8(isa::active(), &y, 1.0 / out_scale, &mut want);
            let mut got = vec![0i8; y.len()];
            let mut scratch = vec![f32::NAN; layer.scratch_len_i8(threads)];
            layer.run_to_i8(pool, batch, &x, res, &mut got, out_scale, &mut scratch);
            assert_eq!(got, want, "{g:?} t{threads}");
            // Saturation happens (the scale is small for these values).
            assert!(got.iter().any(|&v| v.abs() == 127), "{g:?}");
        });
        let pg = geo(8, 8, 4, 1, 1, 0, 1);
        let pointwise = Conv2dNhwc::new(pg, &data(64, 1), None, Activation::None).unwrap();
        assert!(!pointwise.writes_i8() && !pointwise.reads_i8());
        assert!(!Conv2dNhwc::writes_i8_for(&pg));
    }

    #[test]
    fn depthwise_reads_int8_as_the_floats_it_holds() {
        // (c, hw, k, stride, pad): 64 + 16 + tail channels (AVX-512
        // blocks; AVX2 32 + 8 + masked tail), sliding 3×3 / 5×5 rows,
        // stride 2, a map narrower than a pixel group.
        let cases = [
            (100, 9, 3, 1, 1),
            (72, 11, 5, 1, 2),
            (13, 10, 3, 2, 1),
            (24, 3, 5, 2, 2),
        ];
        let acts = [
            (Activation::Clip { lo: 0.0, hi: 6.0 }, false),
            (Activation::None, true),
        ];
        each_depthwise(&cases, &acts, 0.01, |layer, res, pool, threads| {
            let g = *layer.geometry();
            let batch = 2;
            // Every INT8 value, the extremes included.
            let q: Vec<i8> = (0..batch * g.c_in * g.h * g.w)
                .map(|i| ((i * 37 + 11) % 255) as i32 - 127)
                .map(|v| v as i8)
                .collect();
            let xf: Vec<f32> = q.iter().map(|&v| f32::from(v)).collect();
            let (oh, ow) = layer.out_hw();
            let mut want = vec![0.0; batch * g.c_out * oh * ow];
            layer.run(pool, batch, &xf, res, &mut want);
            let mut got = vec![f32::NAN; want.len()];
            layer.run_from_i8(pool, batch, &q, res, &mut got);
            assert_eq!(got, want, "{g:?} t{threads}");
            // And requantized as it is written.
            let out_scale = 0.02f32;
            let mut scratch = vec![f32::NAN; layer.scratch_len_i8(threads)];
            let mut from_f32 = vec![0i8; want.len()];
            layer.run_to_i8(
                pool,
                batch,
                &xf,
                res,
                &mut from_f32,
                out_scale,
                &mut scratch,
            );
            let mut from_i8 = vec![0i8; want.len()];
            layer.run_to_i8(pool, batch, &q, res, &mut from_i8, out_scale, &mut scratch);
            assert_eq!(from_i8, from_f32, "{g:?} t{threads}");
        });
    }

    #[test]
    fn matches_the_reference_on_the_shapes_mobile_nets_use() {
        let cases = [
            // (c_in, c_out, hw, k, stride, pad, groups)
            (16, 96, 12, 1, 1, 0, 1),    // pointwise expand
            (96, 24, 9, 1, 1, 0, 1),     // pointwise project, c_out not a panel multiple
            (3, 32, 15, 3, 2, 1, 1),     // stem: 3 channels, stride 2, padded
            (40, 19, 7, 3, 1, 1, 1),     // 3x3, odd channel counts
            (64, 48, 6, 3, 1, 1, 1),     // weights too big to sweep per tile
            (300, 70, 5, 1, 1, 0, 1),    // the same, five panels: prefetch the next pair / task
            (672, 112, 14, 1, 1, 0, 1),  // long reduction: 14-row tiles (AVX-512), whole ones
            (256, 40, 7, 1, 1, 0, 1),    // the same, 49 pixels: three tiles and 7 rows
            (24, 24, 13, 3, 1, 1, 24),   // depthwise 3x3
            (40, 40, 14, 5, 2, 2, 40),   // depthwise 5x5 stride 2
            (13, 13, 6, 3, 2, 0, 13),    // depthwise, channels not a vector multiple, no pad
            (24, 40, 9, 1, 1, 0, 1),     // three panels: a pair and a lone one (AVX-512)
            (8, 8, 7, 3, 1, 1, 1),       // one narrow panel
            (100, 100, 6, 3, 1, 1, 100), // depthwise: 64 + 16 + 16 + 4 channels (AVX-512)
            (8, 20, 40, 3, 1, 1, 1),     // wide rows: tiles inside one row share tap pointers
            (3, 16, 60, 3, 2, 1, 1),     // a wide stem, stride 2 (AVX-512: one-pointer taps)
            (3, 32, 60, 3, 2, 1, 1),     // the same, two panels
            (3, 16, 30, 3, 1, 1, 1),     // a stem at stride 1
            (3, 40, 30, 3, 1, 1, 1),     // the same, a pair and a lone panel
            (80, 80, 10, 5, 1, 2, 80),   // depthwise 5x5 stride 1: sliding rows (AVX-512)
            (48, 48, 12, 5, 1, 2, 48),   // the same, 16-channel blocks
        ];
        for (ci, co, hw, k, s, p, gr) in cases {
            for act in [
                Activation::None,
                Activation::Clip { lo: 0.0, hi: 6.0 },
                Activation::Silu,
            ] {
                for residual in [false, true] {
                    for threads in [1, 3] {
                        let g = geo(ci, co, hw, k, s, p, gr);
                        let err = check(g, act, residual, threads);
                        assert!(err < 1e-4, "{g:?} {act:?} residual {residual}: error {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn dilation_and_asymmetric_padding() {
        let mut g = geo(8, 20, 11, 3, 1, 0, 1);
        g.dilation = [2, 1];
        g.pads = [2, 0, 1, 3];
        assert!(check(g, Activation::Relu, false, 2) < 1e-4);
        let mut d = geo(16, 16, 11, 3, 2, 0, 16);
        d.dilation = [1, 2];
        d.pads = [0, 1, 2, 1];
        assert!(check(d, Activation::None, true, 2) < 1e-4);
    }

    #[test]
    fn grouped_layers_are_refused_with_the_reason() {
        let g = geo(8, 8, 5, 3, 1, 1, 2);
        let w = data(8 * 4 * 9, 1);
        let e = Conv2dNhwc::new(g, &w, None, Activation::None).unwrap_err();
        assert!(e.to_string().contains("groups 2"), "{e}");
        let short = Conv2dNhwc::new(geo(8, 8, 5, 3, 1, 1, 1), &w[..10], None, Activation::None);
        assert!(short.is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn random_layers_match_the_reference(
            c_in in 1usize..24, c_out in 1usize..40, hw in 1usize..10, k in 1usize..4,
            s in 1usize..3, p in 0usize..2, dw in any::<bool>(), residual in any::<bool>(),
            threads in 1usize..4,
        ) {
            let (c_out, groups) = if dw && c_in > 1 { (c_in, c_in) } else { (c_out, 1) };
            let g = geo(c_in, c_out, hw, k, s, p, groups);
            prop_assume!(g.out_h().is_some_and(|v| v > 0) && g.out_w().is_some_and(|v| v > 0));
            let err = check(g, Activation::Relu, residual, threads);
            prop_assert!(err < 1e-4, "error {}", err);
        }
    }
}
