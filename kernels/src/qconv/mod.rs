//! INT8 convolution (NCHW, one group): symmetric per-output-channel weights,
//! a symmetric per-tensor input scale, exact INT32 accumulation, and the
//! dequantization, bias, residual and activation fused into the epilogue
//! that writes the f32 output.
//!
//! The input is quantized while it is packed (the pass that every GEMM-based
//! convolution makes over its input anyway), so there is no separate
//! quantize step, and the output is dequantized by the same instructions
//! that add the bias: no Q/DQ node pair surrounds the layer.
//!
//! Products use 16-bit lanes holding INT8 values: weights are widened once at
//! load, the input while it is packed, and `madd_epi16` (AVX2) or
//! `smlal` + `addp` (NEON) multiplies pairs and sums them into `i32` exactly — no
//! saturation is possible, unlike `maddubs`, whose `u8 × i8` pair sums can
//! saturate `i16`. The layout is the classic pair-interleaved one:
//! * A (weights, packed at load): per block of [`QMR`] output channels, for
//!   every pair of reduction indices `(2p, 2p+1)`, `QMR` pairs of `i16`.
//! * B (input, packed per task): per panel of [`QNR`] output pixels, for every
//!   pair, `QNR` pairs of `i16`.
//!
//! [`tile_ref`] is the scalar reference of the micro-kernel; every tier is
//! bit-exact with it (tests). [`reference_qconv2d`] is the plain-loop
//! reference of a whole layer.
//!
//! Depthwise layers (one input channel per group, multiplier 1) run the
//! depthwise plane kernel on integer values
//! ([`crate::depthwise::depthwise_plane_int`], exact) with the same epilogue.
//!
//! Input and output may also be INT8 tensors ([`QIn::I8`], [`QOut::I8`]):
//! an INT8 output is requantized in the epilogue with the consumer's input
//! scale, so a chain of INT8 layers passes INT8 tensors and never a
//! dequantize/quantize pair.

use crate::activation::Activation;
use crate::conv::Conv2dGeometry;
use crate::depthwise::{self, PlaneGeometry, PlaneSource};
use crate::error::KernelError;
use crate::isa::{self, Isa};
use crate::pool::{SyncPtr, ThreadPool};

mod pairs;
mod quads;

use pairs::*;
pub use pairs::{tile, tile_ref};
use quads::*;
pub use quads::{tile_quad, tile_quad_ref};

/// Output channels per register tile.
pub const QMR: usize = 6;
/// Output pixels per register tile.
pub const QNR: usize = 16;
/// Output pixels per task (a multiple of [`QNR`]).
const QNC: usize = 64;

/// Largest representable magnitude: symmetric INT8 uses [-127, 127].
pub const QMAX: f32 = 127.0;

/// The dot4 kernel this CPU runs (see [`QConv2d::with_dot4`]):
/// `vpdpbusd` with AVX-512 VNNI, `vpmaddubsw` with AVX2, `sdot` with the
/// NEON dot-product extension (Jetson Orin's Cortex-A78AE has it); `None`
/// without any, or under an `OSPREY_ISA` cap.
pub fn dot4_kernel() -> Option<&'static str> {
    match isa::active() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa::has_vnni() => Some("vpdpbusd"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 => Some("vpmaddubsw"),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon if isa::has_dotprod() => Some("sdot"),
        _ => None,
    }
}

/// Symmetric quantization of one value with the reciprocal of its scale:
/// clamp to ±127 in float, then round half to even (what `cvtps2dq` does
/// in the default rounding mode).
#[inline(always)]
pub fn quantize(x: f32, inv_scale: f32) -> i16 {
    // Adding and removing 1.5·2^23 rounds half to even (the default
    // rounding mode) for |v| ≤ 2^22: here |v| ≤ 127. Unlike
    // `round_ties_even`, it needs no SSE4.1 (a libm call on baseline x86-64).
    const MAGIC: f32 = 12_582_912.0;
    let v = (x * inv_scale).clamp(-QMAX, QMAX);
    ((v + MAGIC) - MAGIC) as i16
}

/// Per-output-channel symmetric weight scales (`max |w| / 127`; 1 for an
/// all-zero channel) and the quantized weights, `[c_out][k]`.
pub fn quantize_weights(weights: &[f32], c_out: usize) -> (Vec<f32>, Vec<i8>) {
    let k = weights.len().checked_div(c_out).unwrap_or(0);
    let mut scales = Vec::with_capacity(c_out);
    let mut q = Vec::with_capacity(c_out * k);
    for row in weights.chunks(k.max(1)).take(c_out) {
        let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if m > 0.0 && m.is_finite() {
            m / QMAX
        } else {
            1.0
        };
        scales.push(s);
        q.extend(row.iter().map(|&w| quantize(w, 1.0 / s) as i8));
    }
    (scales, q)
}

/// A prepared INT8 convolution.
#[derive(Clone, Debug)]
pub struct QConv2d {
    g: Conv2dGeometry,
    oh: usize,
    ow: usize,
    /// Reduction length `c_in·kh·kw`.
    k: usize,
    /// Reduction pairs (`k` rounded up to even, halved).
    kpairs: usize,
    /// Packed weights, `[ceil(c_out / QMR)][kpairs][QMR][2]`.
    a: Vec<i16>,
    /// `weight_scale[c] · input_scale` per output channel.
    out_scale: Vec<f32>,
    bias: Vec<f32>,
    act: Activation,
    input_scale: f32,
    inv_input_scale: f32,
    weight_scales: Vec<f32>,
    /// Depthwise layers: integer-valued weights `[c][kh·kw]` (and `a` empty).
    dw: Option<Vec<f32>>,
    /// Reduction groups of four (`k` rounded up to a multiple of 4, / 4).
    kquads: usize,
    /// The dot4 form (see [`QConv2d::with_dot4`]): the weights as INT8
    /// groups of four, `[ceil(c_out / QMR)][kquads][QMR][4]`, for the
    /// `vpmaddubsw` (AVX2) or `sdot` (NEON dot product) kernel.
    a4: Vec<i8>,
}

/// An INT8 layer's input tensor.
#[derive(Clone, Copy, Debug)]
pub enum QIn<'a> {
    /// f32, quantized with the layer's input scale as it is read.
    F32(&'a [f32]),
    /// Already INT8 with the layer's input scale.
    I8(&'a [i8]),
}

/// An INT8 layer's output tensor.
#[derive(Debug)]
pub enum QOut<'a> {
    /// f32.
    F32(&'a mut [f32]),
    /// INT8 with the given scale (the consumer's input scale).
    I8(&'a mut [i8], f32),
}

/// Where tasks write the output.
#[derive(Clone, Copy)]
enum OutPtr {
    F32(SyncPtr<f32>),
    /// Pointer and the reciprocal output scale.
    I8(SyncPtr<i8>, f32),
}

impl QConv2d {
    /// Quantizes `weights` (`[c_out, c_in, kh, kw]`) per output channel and
    /// prepares the layer for inputs quantized with `input_scale`
    /// (`threshold / 127`, as a calibration cache stores it).
    pub fn new(
        g: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
        input_scale: f32,
    ) -> Result<QConv2d, KernelError> {
        let bad = |detail: String| KernelError::Unsupported {
            kernel: "qconv2d",
            detail,
        };
        let depthwise = g.is_depthwise();
        if g.groups != 1 && !depthwise {
            return Err(bad(format!(
                "{} groups: INT8 convolution takes one group or a depthwise layer",
                g.groups
            )));
        }
        if !(input_scale.is_finite() && input_scale > 0.0) {
            return Err(bad(format!("input scale {input_scale} is not positive")));
        }
        let (oh, ow) = g.validate("qconv2d")?;
        let k = g.c_in / g.groups * g.kh * g.kw;
        let bias = g.checked_bias(["qconv2d weights", "qconv2d bias"], weights, bias)?;
        let (weight_scales, q) = quantize_weights(weights, g.c_out);
        if depthwise && k > 1024 {
            return Err(bad(format!("{k} taps: INT8 depthwise takes at most 1024")));
        }
        // Depthwise: integer-valued f32 weights for the plane kernel;
        // otherwise the GEMM's packed pairs.
        let kquads = k.div_ceil(4);
        let (kpairs, a, dw) = if depthwise {
            (0, Vec::new(), Some(q.iter().map(|&v| v as f32).collect()))
        } else {
            let kpairs = k.div_ceil(2);
            let mblocks = g.c_out.div_ceil(QMR);
            let mut a = vec![0i16; mblocks * kpairs * QMR * 2];
            for co in 0..g.c_out {
                let (blk, r) = (co / QMR, co % QMR);
                for kk in 0..k {
                    a[((blk * kpairs + kk / 2) * QMR + r) * 2 + kk % 2] = q[co * k + kk] as i16;
                }
            }
            (kpairs, a, None)
        };
        Ok(QConv2d {
            g,
            oh,
            ow,
            k,
            kquads,
            a4: Vec::new(),
            kpairs,
            a,
            out_scale: weight_scales.iter().map(|s| s * input_scale).collect(),
            bias,
            act,
            input_scale,
            inv_input_scale: 1.0 / input_scale,
            weight_scales,
            dw,
        })
    }

    /// Selects the dot4 form of the kernel (`on`), where this CPU has one
    /// ([`dot4_kernel`]) and the layer is not depthwise; otherwise, or with
    /// `on` false, the pair form. Both are exact; only the speed differs,
    /// so the builder times them as two tactics:
    /// * AVX2 `vpmaddubsw` on groups of four: about 1.1–2x faster than the
    ///   pair kernel on non-negative inputs (after a ReLU, ReLU6 or
    ///   sigmoid; criterion), slower on signed ones, whose panels take the
    ///   kernel's exact signed form.
    /// * NEON `sdot`: four products per lane and instruction, twice the
    ///   pair kernel's `smlal`, on any sign.
    pub fn with_dot4(mut self, on: bool) -> QConv2d {
        if !on || self.dw.is_some() || dot4_kernel().is_none() {
            self.a4 = Vec::new();
            return self;
        }
        let (k, kq) = (self.k, self.kquads);
        let mblocks = self.g.c_out.div_ceil(QMR);
        let mut a4 = vec![0i8; mblocks * kq * QMR * 4];
        for co in 0..self.g.c_out {
            let (blk, r) = (co / QMR, co % QMR);
            for kk in 0..k {
                // The packed pairs hold the INT8 weights as i16.
                let w = self.a[((blk * self.kpairs + kk / 2) * QMR + r) * 2 + kk % 2];
                a4[((blk * kq + kk / 4) * QMR + r) * 4 + kk % 4] = w as i8;
            }
        }
        self.a4 = a4;
        self
    }

    /// The geometry.
    pub fn geometry(&self) -> &Conv2dGeometry {
        &self.g
    }

    /// The input scale the layer quantizes with.
    pub fn input_scale(&self) -> f32 {
        self.input_scale
    }

    /// Per-output-channel weight scales.
    pub fn weight_scales(&self) -> &[f32] {
        &self.weight_scales
    }

    /// Output (height, width).
    pub fn out_hw(&self) -> (usize, usize) {
        (self.oh, self.ow)
    }

    /// Bytes of packed weights held.
    pub fn weight_bytes(&self) -> usize {
        self.a.len() * 2 + self.a4.len() + self.dw.as_ref().map_or(0, |w| w.len() * 4)
    }

    /// Name for reports and tactic name: `int8-depthwise`,
    /// `int8-pointwise`, `int8-im2col`, the last two with `-dot4` in the
    /// dot4 form.
    pub fn algorithm(&self) -> &'static str {
        match (self.dw.is_some(), self.is_pointwise(), self.dot4()) {
            (true, _, _) => "int8-depthwise",
            (_, true, false) => "int8-pointwise",
            (_, true, true) => "int8-pointwise-dot4",
            (_, false, false) => "int8-im2col",
            (_, false, true) => "int8-im2col-dot4",
        }
    }

    /// Whether the layer runs the dot4 form (see [`QConv2d::with_dot4`]).
    pub fn dot4(&self) -> bool {
        !self.a4.is_empty()
    }

    fn is_pointwise(&self) -> bool {
        let g = &self.g;
        g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.pads == [0; 4]
    }

    /// Scratch f32 elements [`QConv2d::run`] needs on a pool of `threads`
    /// (one packed input chunk per thread).
    pub fn scratch_len(&self, threads: usize) -> usize {
        if self.dw.is_some() {
            return threads.max(1) * self.dw_slot();
        }
        threads.max(1) * (self.kpairs * QNC * 2).div_ceil(2)
    }

    /// Depthwise: one plane's geometry.
    fn plane(&self) -> PlaneGeometry {
        self.g.plane(self.oh, self.ow)
    }

    /// Depthwise: scratch floats per thread (padded plane, row, accumulators).
    fn dw_slot(&self) -> usize {
        depthwise::int_scratch_len(&self.plane()) + self.oh * self.ow
    }

    /// Runs `batch` images: `input` `[batch, c_in, h, w]`, `output`
    /// `[batch, c_out, oh, ow]`; `residual` (output-shaped) is added before
    /// the activation.
    ///
    /// # Panics
    /// If a buffer is shorter than the geometry needs (the engine checks
    /// sizes when it plans memory).
    pub fn run(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[f32],
        residual: Option<&[f32]>,
        output: &mut [f32],
        scratch: &mut [f32],
    ) {
        self.run_io(
            pool,
            batch,
            QIn::F32(input),
            residual,
            QOut::F32(output),
            scratch,
        )
    }

    /// [`QConv2d::run`] with INT8 or f32 input and output tensors.
    ///
    /// # Panics
    /// As [`QConv2d::run`].
    pub fn run_io(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: QIn,
        residual: Option<&[f32]>,
        output: QOut,
        scratch: &mut [f32],
    ) {
        let g = &self.g;
        let in_img = g.c_in * g.h * g.w;
        let ohw = self.oh * self.ow;
        let out_img = g.c_out * ohw;
        let in_len = match input {
            QIn::F32(x) => x.len(),
            QIn::I8(x) => x.len(),
        };
        let (out_len, out) = match output {
            QOut::F32(y) => (y.len(), OutPtr::F32(SyncPtr::new(y))),
            QOut::I8(y, s) => (y.len(), OutPtr::I8(SyncPtr::new(y), 1.0 / s)),
        };
        assert!(in_len >= batch * in_img && out_len >= batch * out_img);
        assert!(residual.is_none_or(|r| r.len() >= batch * out_img));
        assert!(scratch.len() >= self.scratch_len(pool.threads()));
        if let Some(w) = &self.dw {
            self.run_depthwise(pool, batch, w, input, residual, out, scratch);
            return;
        }
        let per_slot = self.kpairs * QNC * 2;
        // SAFETY: f32 is at least as aligned as i16 and twice its size, so
        // the reinterpreted slice lies within `scratch`.
        let scratch_i16 = unsafe {
            std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut i16, scratch.len() * 2)
        };
        let s_ptr = SyncPtr::new(scratch_i16);
        let isa = isa::active();
        #[cfg(target_arch = "x86_64")]
        let clamp = crate::gemm::in_register_clamp(self.act);
        let mblocks = g.c_out.div_ceil(QMR);
        let chunks = ohw.div_ceil(QNC);
        // Few pixels (late, small layers): split the channels as well.
        let parts = if chunks >= 2 * pool.threads() {
            1
        } else {
            pool.threads().min(mblocks).max(1)
        };
        for b in 0..batch {
            let x = match input {
                QIn::F32(x) => QIn::F32(&x[b * in_img..(b + 1) * in_img]),
                QIn::I8(x) => QIn::I8(&x[b * in_img..(b + 1) * in_img]),
            };
            let res = residual.map(|r| &r[b * out_img..(b + 1) * out_img]);
            // SAFETY: image b's output starts at b·out_img < out_len.
            let y_ptr = unsafe {
                match out {
                    OutPtr::F32(p) => OutPtr::F32(SyncPtr(p.add(b * out_img))),
                    OutPtr::I8(p, inv) => OutPtr::I8(SyncPtr(p.add(b * out_img)), inv),
                }
            };
            pool.run(chunks * parts, &|t, slot| {
                let (chunk, part) = (t / parts, t % parts);
                let p0 = chunk * QNC;
                let n = QNC.min(ohw - p0);
                // SAFETY: each thread slot owns a disjoint window of scratch
                // (sized by `scratch_len` for the pool's thread count).
                let bbuf =
                    unsafe { std::slice::from_raw_parts_mut(s_ptr.add(slot * per_slot), per_slot) };
                let (m0, m1) = (part * mblocks / parts, (part + 1) * mblocks / parts);
                #[cfg(target_arch = "x86_64")]
                let fused = |blk: usize, px: usize| {
                    let rows = QMR.min(g.c_out - blk * QMR);
                    let co = blk * QMR;
                    let (y, y8, inv_out) = match y_ptr {
                        OutPtr::F32(p) => (p.0, std::ptr::null_mut(), 1.0),
                        OutPtr::I8(p, inv) => (std::ptr::null_mut(), p.0, inv),
                    };
                    Fused {
                        y,
                        y8,
                        inv_out,
                        ldy: ohw,
                        res: res.map_or(std::ptr::null(), |r| r.as_ptr()),
                        offset: co * ohw + px,
                        rows,
                        scale: &self.out_scale[co..co + rows],
                        bias: &self.bias[co..co + rows],
                        clamp,
                        act: self.act,
                    }
                };
                if !self.a4.is_empty() {
                    // The dot4 form (a4 is only built where a dot4 kernel
                    // exists).
                    let q4 = self.kquads * QNR * 4;
                    // SAFETY: the slot's i16 scratch viewed as twice as many
                    // bytes; kquads·QNC·4 bytes ≤ kpairs·QNC·2 i16.
                    let b8 = unsafe {
                        std::slice::from_raw_parts_mut(bbuf.as_mut_ptr() as *mut i8, bbuf.len() * 2)
                    };
                    let mut nonneg = [false; QNC / QNR];
                    self.pack_input_quads(isa, x, p0, n, b8, &mut nonneg);
                    for blk in m0..m1 {
                        let a = &self.a4
                            [blk * self.kquads * QMR * 4..(blk + 1) * self.kquads * QMR * 4];
                        for pi in 0..n.div_ceil(QNR) {
                            let panel = &b8[pi * q4..(pi + 1) * q4];
                            let px = p0 + pi * QNR;
                            let cols = QNR.min(ohw - px);
                            let mut acc = [[0i32; QNR]; QMR];
                            #[cfg(target_arch = "x86_64")]
                            if isa.has_avx2() {
                                // SAFETY: AVX2 and FMA are active; a and
                                // panel hold kquads groups; the rows × 16
                                // outputs at the tile's offset are this
                                // task's own.
                                unsafe {
                                    let c = products_quad_avx2(self.kquads, a, panel, nonneg[pi]);
                                    if cols == QNR {
                                        epilogue_avx2(&c, &fused(blk, px));
                                        continue;
                                    }
                                    accumulate_avx2(&c, &mut acc);
                                }
                                self.store_partial(isa, blk, px, cols, ohw, &acc, res, y_ptr);
                                continue;
                            }
                            tile_quad(isa, self.kquads, a, panel, &mut acc);
                            self.store_partial(isa, blk, px, cols, ohw, &acc, res, y_ptr);
                        }
                    }
                    return;
                }
                self.pack_input(isa, x, p0, n, bbuf);
                for blk in m0..m1 {
                    let a = &self.a[blk * self.kpairs * QMR * 2..(blk + 1) * self.kpairs * QMR * 2];
                    for (pi, panel) in bbuf
                        .chunks_exact(self.kpairs * QNR * 2)
                        .take(n.div_ceil(QNR))
                        .enumerate()
                    {
                        let px = p0 + pi * QNR;
                        let cols = QNR.min(ohw - px);
                        #[cfg(target_arch = "x86_64")]
                        if isa.has_avx2() && cols == QNR {
                            // SAFETY: AVX2 is active; a and panel hold kpairs
                            // pairs; the `rows` × 16 output (and residual)
                            // elements at the tile's offset are this task's own.
                            unsafe { tile_avx2_fused(self.kpairs, a, panel, &fused(blk, px)) };
                            continue;
                        }
                        let mut acc = [[0i32; QNR]; QMR];
                        tile(isa, self.kpairs, a, panel, &mut acc);
                        self.store_partial(isa, blk, px, cols, ohw, &acc, res, y_ptr);
                    }
                }
            });
        }
    }

    /// The scalar epilogue of a tile (a partial one, or any without AVX2):
    /// `cols` pixels at `px` of output channels `blk·QMR..`.
    #[allow(clippy::too_many_arguments)]
    fn store_partial(
        &self,
        isa: Isa,
        blk: usize,
        px: usize,
        cols: usize,
        ohw: usize,
        acc: &[[i32; QNR]; QMR],
        res: Option<&[f32]>,
        y_ptr: OutPtr,
    ) {
        for (r, row) in acc.iter().enumerate() {
            let co = blk * QMR + r;
            if co >= self.g.c_out {
                break;
            }
            let rres = res.map(|r| &r[co * ohw + px..co * ohw + px + cols]);
            match y_ptr {
                OutPtr::F32(p) => {
                    // SAFETY: tasks write disjoint (channel block, pixel
                    // chunk) ranges of the output.
                    let out = unsafe { std::slice::from_raw_parts_mut(p.add(co * ohw + px), cols) };
                    self.epilogue(co, &row[..cols], rres, out);
                }
                OutPtr::I8(p, inv) => {
                    // SAFETY: as for f32 outputs.
                    let out = unsafe { std::slice::from_raw_parts_mut(p.add(co * ohw + px), cols) };
                    let mut v = [0f32; QNR];
                    self.epilogue(co, &row[..cols], rres, &mut v[..cols]);
                    crate::int8::quantize_to_i8(isa, &v[..cols], inv, out);
                }
            }
        }
    }

    /// Quantizes and packs output pixels `[p0, p0 + n)` of the unfolded
    /// input into `QNR`-pixel panels of INT8 groups of four reduction
    /// indices (`[kquads][QNR][4]` per panel; padding and the reduction
    /// tail are zeros). `nonneg[p]`: panel `p` holds no negative value.
    fn pack_input_quads(
        &self,
        isa: Isa,
        x: QIn,
        p0: usize,
        n: usize,
        buf: &mut [i8],
        nonneg: &mut [bool; QNC / QNR],
    ) {
        let g = &self.g;
        let hw = g.h * g.w;
        let khw = g.kh * g.kw;
        let q4 = self.kquads * QNR * 4;
        let mut rows = [[0i8; QNR]; 4];
        let mut vals = [0f32; QNR];
        let mut corner = [(0usize, 0usize); QNR];
        for pi in 0..n.div_ceil(QNR) {
            let px = p0 + pi * QNR;
            let cols = QNR.min(p0 + n - px);
            let panel = &mut buf[pi * q4..(pi + 1) * q4];
            let mut neg = false;
            if self.is_pointwise() && cols == QNR {
                // Full panels of a pointwise layer: four channel rows of 16
                // pixels per group, straight from the tensor.
                for kq in 0..self.kquads {
                    let row = |j: usize| {
                        let c = 4 * kq + j;
                        (c < g.c_in).then_some(c * hw + px)
                    };
                    let starts = [row(0), row(1), row(2), row(3)];
                    let dst = &mut panel[kq * QNR * 4..(kq + 1) * QNR * 4];
                    neg |= pack_quad(isa, x, starts, self.inv_input_scale, dst, &mut rows);
                }
                nonneg[pi] = !neg;
                continue;
            }
            for (j, c) in corner.iter_mut().enumerate().take(cols) {
                let p = px + j;
                *c = ((p / self.ow) * g.stride[0], (p % self.ow) * g.stride[1]);
            }
            for kq in 0..self.kquads {
                for (j, row) in rows.iter_mut().enumerate() {
                    let kk = 4 * kq + j;
                    row.iter_mut().for_each(|v| *v = 0);
                    if kk >= self.k {
                        continue;
                    }
                    // Gather reduction row (ci, ky, kx) for the panel (a
                    // pointwise layer's is channel ci itself).
                    let (ci, rem) = (kk / khw, kk % khw);
                    let (ky, kx) = (rem / g.kw, rem % g.kw);
                    let (dy, dx) = (ky * g.dilation[0], kx * g.dilation[1]);
                    vals.iter_mut().for_each(|v| *v = 0.0);
                    for (v, &(cy, cx)) in vals.iter_mut().zip(&corner).take(cols) {
                        let iy = (cy + dy).wrapping_sub(g.pads[0]);
                        let ix = (cx + dx).wrapping_sub(g.pads[1]);
                        if iy < g.h && ix < g.w {
                            let i = ci * hw + iy * g.w + ix;
                            *v = match x {
                                QIn::F32(x) => x[i] * self.inv_input_scale,
                                QIn::I8(x) => x[i] as f32,
                            };
                        }
                    }
                    // Values already scaled: quantize with scale 1.
                    crate::int8::quantize_to_i8(isa, &vals[..cols], 1.0, &mut row[..cols]);
                }
                neg |= interleave4(isa, &rows, &mut panel[kq * QNR * 4..(kq + 1) * QNR * 4]);
            }
            nonneg[pi] = !neg;
        }
    }

    /// Depthwise: one task per (image, channel) plane.
    #[allow(clippy::too_many_arguments)]
    fn run_depthwise(
        &self,
        pool: &ThreadPool,
        batch: usize,
        w: &[f32],
        input: QIn,
        residual: Option<&[f32]>,
        out: OutPtr,
        scratch: &mut [f32],
    ) {
        let g = &self.g;
        let plane = self.plane();
        let (hw, ohw, taps) = (g.h * g.w, self.oh * self.ow, g.kh * g.kw);
        let per_slot = self.dw_slot();
        let isa = isa::active();
        let s_ptr = SyncPtr::new(scratch);
        let task = |t: usize, slot: usize| {
            let (b, c) = (t / g.c_in, t % g.c_in);
            let p = b * g.c_in + c;
            let src = match input {
                QIn::F32(x) => {
                    PlaneSource::Quantize(&x[p * hw..(p + 1) * hw], self.inv_input_scale)
                }
                QIn::I8(x) => PlaneSource::I8(&x[p * hw..(p + 1) * hw]),
            };
            // SAFETY: each thread slot owns a disjoint window of scratch
            // (sized by `scratch_len` for the pool's thread count).
            let slot_buf =
                unsafe { std::slice::from_raw_parts_mut(s_ptr.add(slot * per_slot), per_slot) };
            let (buf, acc) = slot_buf.split_at_mut(per_slot - ohw);
            let wc = &w[c * taps..(c + 1) * taps];
            let (s, bias) = (self.out_scale[c], self.bias[c]);
            // Without a residual and with a clamp-like activation, the
            // plane kernel applies the whole epilogue in registers.
            let fused = match (residual, crate::gemm::in_register_clamp(self.act)) {
                (None, Some((lo, hi))) => Some(depthwise::Requant {
                    scale: s,
                    bias,
                    lo,
                    hi,
                }),
                _ => None,
            };
            if let Some(r) = fused {
                let out = match out {
                    // SAFETY: each task writes only plane p of the output.
                    OutPtr::F32(y) => depthwise::IntPlaneOut::F32(
                        unsafe { std::slice::from_raw_parts_mut(y.add(p * ohw), ohw) },
                        r,
                    ),
                    // SAFETY: as above.
                    OutPtr::I8(y, inv) => depthwise::IntPlaneOut::I8(
                        unsafe { std::slice::from_raw_parts_mut(y.add(p * ohw), ohw) },
                        r,
                        inv,
                    ),
                };
                depthwise::depthwise_plane_int(isa, &plane, src, wc, out, buf);
                return;
            }
            let out_acc = depthwise::IntPlaneOut::Acc(&mut *acc);
            depthwise::depthwise_plane_int(isa, &plane, src, wc, out_acc, buf);
            acc.iter_mut().for_each(|v| *v = *v * s + bias);
            if let Some(r) = residual {
                acc.iter_mut()
                    .zip(&r[p * ohw..(p + 1) * ohw])
                    .for_each(|(v, r)| *v += r);
            }
            self.act.apply_slice(acc);
            match out {
                OutPtr::F32(y) => {
                    // SAFETY: each task writes only plane p of the output.
                    let y = unsafe { std::slice::from_raw_parts_mut(y.add(p * ohw), ohw) };
                    y.copy_from_slice(acc);
                }
                OutPtr::I8(y, inv) => {
                    // SAFETY: each task writes only plane p of the output.
                    let y = unsafe { std::slice::from_raw_parts_mut(y.add(p * ohw), ohw) };
                    crate::int8::quantize_to_i8(isa, acc, inv, y);
                }
            }
        };
        pool.run(batch * g.c_in, &task);
    }

    /// `out = act(acc · out_scale[co] + bias[co] (+ res))`.
    #[inline]
    fn epilogue(&self, co: usize, acc: &[i32], res: Option<&[f32]>, out: &mut [f32]) {
        let (s, b) = (self.out_scale[co], self.bias[co]);
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = a as f32 * s + b;
        }
        if let Some(r) = res {
            out.iter_mut().zip(r).for_each(|(o, r)| *o += r);
        }
        self.act.apply_slice(out);
    }

    /// Quantizes and packs output pixels `[p0, p0 + n)` of the input's
    /// unfolded (im2col) matrix into `QNR`-pixel panels of pairs; padding
    /// pixels and the odd reduction tail are zeros.
    fn pack_input(&self, isa: Isa, x: QIn, p0: usize, n: usize, buf: &mut [i16]) {
        let g = &self.g;
        let panels = n.div_ceil(QNR);
        // INT8 values are gathered as f32 and "quantized" with scale 1,
        // which returns them unchanged.
        let (xf, x8, inv) = match x {
            QIn::F32(x) => (x, &[][..], self.inv_input_scale),
            QIn::I8(x) => (&[][..], x, 1.0),
        };
        let hw = g.h * g.w;
        if self.is_pointwise() {
            for pi in 0..panels {
                let px = p0 + pi * QNR;
                let cols = QNR.min(p0 + n - px);
                let panel = &mut buf[pi * self.kpairs * QNR * 2..(pi + 1) * self.kpairs * QNR * 2];
                for kp in 0..self.kpairs {
                    let dst = &mut panel[kp * QNR * 2..(kp + 1) * QNR * 2];
                    let c0 = 2 * kp;
                    let (i0, i1) = (c0 * hw + px, (c0 + 1) * hw + px);
                    let has1 = c0 + 1 < g.c_in;
                    if let QIn::I8(x) = x {
                        pack_pair_rows_i8(
                            isa,
                            &x[i0..i0 + cols],
                            has1.then(|| &x[i1..i1 + cols]),
                            dst,
                        );
                        continue;
                    }
                    let r0 = &xf[i0..i0 + cols];
                    let r1 = has1.then(|| &xf[i1..i1 + cols]);
                    pack_pair_rows(isa, r0, r1, inv, dst);
                }
            }
            return;
        }
        // General case: gather each reduction row (ci, ky, kx) for the
        // panel's pixels.
        let khw = g.kh * g.kw;
        let mut row = [0f32; QNR];
        let mut prev = [0f32; QNR];
        // Top-left input corner (unpadded coordinates + pads) per pixel.
        let mut corner = [(0usize, 0usize); QNR];
        for pi in 0..panels {
            let px = p0 + pi * QNR;
            let cols = QNR.min(p0 + n - px);
            let panel = &mut buf[pi * self.kpairs * QNR * 2..(pi + 1) * self.kpairs * QNR * 2];
            for (j, c) in corner.iter_mut().enumerate().take(cols) {
                let p = px + j;
                *c = ((p / self.ow) * g.stride[0], (p % self.ow) * g.stride[1]);
            }
            for kk in 0..self.kpairs * 2 {
                row.iter_mut().for_each(|v| *v = 0.0);
                if kk < self.k {
                    let (ci, rem) = (kk / khw, kk % khw);
                    let (ky, kx) = (rem / g.kw, rem % g.kw);
                    let (dy, dx) = (ky * g.dilation[0], kx * g.dilation[1]);
                    for (v, &(cy, cx)) in row.iter_mut().zip(&corner).take(cols) {
                        let iy = (cy + dy).wrapping_sub(g.pads[0]);
                        let ix = (cx + dx).wrapping_sub(g.pads[1]);
                        if iy < g.h && ix < g.w {
                            let i = ci * hw + iy * g.w + ix;
                            *v = if x8.is_empty() { xf[i] } else { x8[i] as f32 };
                        }
                    }
                }
                if kk % 2 == 1 {
                    let dst = &mut panel[(kk / 2) * QNR * 2..(kk / 2 + 1) * QNR * 2];
                    pack_pair_rows(isa, &prev, Some(&row), inv, dst);
                } else {
                    prev = row;
                }
            }
        }
    }
}

/// Where a fused AVX2 tile writes: `rows` output rows of 16 pixels at
/// `offset` (row stride `ldy`), with the epilogue's parameters.
#[cfg(target_arch = "x86_64")]
struct Fused<'a> {
    /// f32 output (null when the output is INT8).
    y: *mut f32,
    /// INT8 output (null when the output is f32).
    y8: *mut i8,
    /// Reciprocal INT8 output scale.
    inv_out: f32,
    ldy: usize,
    /// Residual laid out like `y` (null for none).
    res: *const f32,
    offset: usize,
    rows: usize,
    scale: &'a [f32],
    bias: &'a [f32],
    /// The activation as a clamp, when it is one.
    clamp: Option<(f32, f32)>,
    act: Activation,
}

/// Adds a tile of AVX2 accumulators `c` (two 8-lane vectors per row) to
/// `acc`.
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(c: &[[std::arch::x86_64::__m256i; 2]; QMR], acc: &mut [[i32; QNR]; QMR]) {
    use std::arch::x86_64::*;
    for (row, cr) in acc.iter_mut().zip(c) {
        let mut lanes = [0i32; QNR];
        // SAFETY: `lanes` holds 16 i32 = two 256-bit stores.
        unsafe {
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, cr[0]);
            _mm256_storeu_si256(lanes.as_mut_ptr().add(8) as *mut __m256i, cr[1]);
        }
        row.iter_mut().zip(lanes).for_each(|(x, l)| *x += l);
    }
}

/// The fused epilogue of a full 16-pixel tile of accumulators `c`.
///
/// # Safety
/// AVX2 and FMA must be present; the output and residual ranges described
/// by `f` must be valid and not written by anyone else meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn epilogue_avx2(c: &[[std::arch::x86_64::__m256i; 2]; QMR], f: &Fused) {
    use std::arch::x86_64::*;
    let (lo, hi) = f.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let mut tmp = [0f32; QNR];
    let vinv = _mm256_set1_ps(f.inv_out);
    let (qlo, qhi) = (_mm256_set1_ps(-QMAX), _mm256_set1_ps(QMAX));
    for (r, cr) in c.iter().enumerate().take(f.rows) {
        let (s, bias) = (_mm256_set1_ps(f.scale[r]), _mm256_set1_ps(f.bias[r]));
        let o = f.offset + r * f.ldy;
        let mut v = [_mm256_setzero_ps(); 2];
        for (h, acc) in cr.iter().enumerate() {
            v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*acc), s, bias);
            if !f.res.is_null() {
                // SAFETY: forwarded contract: 16 residual elements at `o`.
                v[h] = _mm256_add_ps(v[h], unsafe { _mm256_loadu_ps(f.res.add(o + 8 * h)) });
            }
            if f.clamp.is_some() {
                v[h] = _mm256_min_ps(_mm256_max_ps(v[h], vlo), vhi);
            }
        }
        if f.clamp.is_none() {
            // Another activation: apply it to the 16 values in memory.
            // SAFETY: `tmp` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(tmp.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v[1]);
            }
            f.act.apply_slice(&mut tmp);
            // SAFETY: as above.
            unsafe {
                v[0] = _mm256_loadu_ps(tmp.as_ptr());
                v[1] = _mm256_loadu_ps(tmp.as_ptr().add(8));
            }
        }
        if f.y8.is_null() {
            // SAFETY: forwarded contract: 16 f32 outputs at `o`.
            unsafe {
                _mm256_storeu_ps(f.y.add(o), v[0]);
                _mm256_storeu_ps(f.y.add(o + 8), v[1]);
            }
        } else {
            // Requantize in registers: scale, clamp to ±127, round half to
            // even (`cvtps2dq`), narrow with saturating packs.
            let q = |v: __m256| {
                _mm256_cvtps_epi32(_mm256_min_ps(
                    _mm256_max_ps(_mm256_mul_ps(v, vinv), qlo),
                    qhi,
                ))
            };
            let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q(v[0]), q(v[1])));
            let bytes =
                _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
            // SAFETY: forwarded contract: 16 INT8 outputs at `o`.
            unsafe { _mm_storeu_si128(f.y8.add(o) as *mut __m128i, bytes) };
        }
    }
}

/// Plain-loop reference of a whole INT8 convolution (one image): quantize
/// input and weights exactly as [`QConv2d`] does, accumulate in `i64`, then
/// `act(acc · s_w · s_x + bias (+ residual))`.
#[allow(clippy::too_many_arguments)]
pub fn reference_qconv2d(
    g: &Conv2dGeometry,
    x: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Activation,
    input_scale: f32,
    y: &mut [f32],
) {
    let (oh, ow) = (g.out_h().unwrap_or(0), g.out_w().unwrap_or(0));
    let (ws, wq) = quantize_weights(weights, g.c_out);
    let groups = g.groups.max(1);
    let (cin_g, cout_g) = (g.c_in / groups, g.c_out / groups);
    let k = cin_g * g.kh * g.kw;
    let inv = 1.0 / input_scale;
    for co in 0..g.c_out {
        let first = co / cout_g.max(1) * cin_g;
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0i64;
                for ci in first..first + cin_g {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                - g.pads[0] as isize;
                            let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                - g.pads[1] as isize;
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            let xv = x[ci * g.h * g.w + iy as usize * g.w + ix as usize];
                            let wv = wq[co * k + ((ci - first) * g.kh + ky) * g.kw + kx];
                            acc += quantize(xv, inv) as i64 * wv as i64;
                        }
                    }
                }
                let o = co * oh * ow + oy * ow + ox;
                let mut v = acc as f32 * (ws[co] * input_scale) + bias.map_or(0.0, |b| b[co]);
                if let Some(r) = residual {
                    v += r[o];
                }
                y[o] = act.apply(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::reference_conv2d;
    use proptest::prelude::*;

    fn rand_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    /// The `vpmaddubsw` kernel, both forms, against plain sums: exact even
    /// with every value at ±127 (the largest pair sums).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn quad_products_are_exact() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("quad_products_are_exact: no AVX2 on this CPU, nothing to test");
            return;
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 56) as i8).max(-127)
        };
        for nonneg in [true, false] {
            for kquads in [0usize, 1, 3, 17, 64] {
                for extremes in [false, true] {
                    let a: Vec<i8> = (0..kquads * QMR * 4)
                        .map(|i| if extremes { [127, -127][i % 2] } else { next() })
                        .collect();
                    let b: Vec<i8> = (0..kquads * QNR * 4)
                        .map(|i| {
                            let v = if extremes {
                                [127, -127][i / 3 % 2]
                            } else {
                                next()
                            };
                            if nonneg {
                                v.abs()
                            } else {
                                v
                            }
                        })
                        .collect();
                    // SAFETY: AVX2 checked above; lengths as the kernel needs.
                    let c = unsafe { products_quad_avx2(kquads, &a, &b, nonneg) };
                    for (r, cr) in c.iter().enumerate() {
                        let mut got = [0i32; QNR];
                        // SAFETY: `got` holds 16 i32.
                        unsafe {
                            use std::arch::x86_64::*;
                            _mm256_storeu_si256(got.as_mut_ptr() as *mut __m256i, cr[0]);
                            _mm256_storeu_si256(got.as_mut_ptr().add(8) as *mut __m256i, cr[1]);
                        }
                        for (j, &g) in got.iter().enumerate() {
                            let want: i32 = (0..kquads * 4)
                                .map(|k| {
                                    let (q, t) = (k / 4, k % 4);
                                    a[(q * QMR + r) * 4 + t] as i32
                                        * b[(q * QNR + j) * 4 + t] as i32
                                })
                                .sum();
                            assert_eq!(g, want, "nonneg {nonneg} kquads {kquads} row {r} px {j}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        assert_eq!(quantize(0.5, 1.0), 0);
        assert_eq!(quantize(1.5, 1.0), 2);
        assert_eq!(quantize(-2.5, 1.0), -2);
        assert_eq!(quantize(1e30, 1.0), 127);
        assert_eq!(quantize(-1e30, 1.0), -127);
        assert_eq!(quantize(f32::INFINITY, 1.0), 127);
    }

    #[test]
    fn weights_use_the_full_range_per_channel() {
        let w = [0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 2.0, 1.0, -0.5];
        let (s, q) = quantize_weights(&w, 3);
        assert_eq!(s, vec![1.0 / 127.0, 1.0, 2.0 / 127.0]);
        assert_eq!(q, vec![64, -127, 32, 0, 0, 0, 127, 64, -32]);
    }

    #[test]
    fn bad_layers_are_refused() {
        let g = geo(4, 5, 5, 4, 3, 1, 1, 2);
        let w = vec![0.1; 4 * 2 * 9];
        assert!(QConv2d::new(g, &w, None, Activation::None, 0.1).is_err());
        let g = geo(4, 5, 5, 4, 3, 1, 1, 1);
        let w = vec![0.1; 4 * 4 * 9];
        assert!(QConv2d::new(g, &w, None, Activation::None, 0.0).is_err());
        assert!(QConv2d::new(g, &w, None, Activation::None, f32::NAN).is_err());
        assert!(QConv2d::new(g, &w[1..], None, Activation::None, 0.1).is_err());
        assert!(QConv2d::new(g, &w, Some(&[0.0; 3]), Activation::None, 0.1).is_err());
    }

    #[allow(clippy::too_many_arguments)]
    fn geo(
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        k: usize,
        s: usize,
        p: usize,
        groups: usize,
    ) -> Conv2dGeometry {
        Conv2dGeometry {
            c_in,
            h,
            w,
            c_out,
            kh: k,
            kw: k,
            stride: [s, s],
            dilation: [1, 1],
            pads: [p; 4],
            groups,
        }
    }

    proptest! {
        #[test]
        fn tile_is_bit_exact(kpairs in 0usize..40, seed in any::<u64>()) {
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 56) as i8) as i16 };
            // Extremes included: -128 never occurs in the packed operands
            // (symmetric quantization), but the kernel must still be exact.
            let a: Vec<i16> = (0..kpairs * QMR * 2).map(|_| next()).collect();
            let b: Vec<i16> = (0..kpairs * QNR * 2).map(|_| next()).collect();
            let mut want = [[7i32; QNR]; QMR];
            let mut got = want;
            tile_ref(kpairs, &a, &b, &mut want);
            tile(isa::active(), kpairs, &a, &b, &mut got);
            prop_assert_eq!(want, got);
        }

        #[test]
        fn tile_quad_is_bit_exact(kquads in 0usize..40, seed in any::<u64>(), extremes: bool) {
            let mut s = seed | 1;
            let mut next = || {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                let v = ((s >> 56) as i8).max(-127);
                // ±127 only: the largest sums of four products.
                if extremes { if v < 0 { -127 } else { 127 } } else { v }
            };
            let a: Vec<i8> = (0..kquads * QMR * 4).map(|_| next()).collect();
            let b: Vec<i8> = (0..kquads * QNR * 4).map(|_| next()).collect();
            let mut want = [[7i32; QNR]; QMR];
            let mut got = want;
            tile_quad_ref(kquads, &a, &b, &mut want);
            tile_quad(isa::active(), kquads, &a, &b, &mut got);
            prop_assert_eq!(want, got);
        }

        #[test]
        fn interleave4_equals_the_plain_loop(seed in any::<u64>()) {
            let v = rand_vec(seed, 4 * QNR, -128.0, 127.0);
            let mut rows = [[0i8; QNR]; 4];
            for (i, x) in v.iter().enumerate() {
                rows[i / QNR][i % QNR] = *x as i8;
            }
            let (mut want, mut got) = ([0i8; 4 * QNR], [0i8; 4 * QNR]);
            let want_neg = interleave4(Isa::Scalar, &rows, &mut want);
            let got_neg = interleave4(isa::active(), &rows, &mut got);
            prop_assert_eq!(want, got);
            prop_assert_eq!(want_neg, got_neg);
            rows.iter_mut().flatten().for_each(|v| *v = v.saturating_abs());
            prop_assert!(!interleave4(isa::active(), &rows, &mut got));
        }

        #[test]
        fn conv_equals_the_reference(
            c_in in 1usize..12, c_out in 1usize..14, h in 1usize..12, w in 1usize..12,
            k in prop::sample::select(vec![1usize, 3, 5]), s in 1usize..3, p in 0usize..3,
            act in prop::sample::select(vec![Activation::None, Activation::Relu, Activation::Clip { lo: 0.0, hi: 6.0 }]),
            residual in any::<bool>(), threads in 1usize..4, seed in any::<u64>(),
        ) {
            let g = geo(c_in, h, w, c_out, k, s, p, 1);
            prop_assume!(g.out_h().unwrap_or(0) > 0 && g.out_w().unwrap_or(0) > 0);
            let (oh, ow) = (g.out_h().unwrap(), g.out_w().unwrap());
            let x = rand_vec(seed, c_in * h * w, -3.0, 3.0);
            let wts = rand_vec(seed ^ 0x55, c_out * c_in * k * k, -1.0, 1.0);
            let bias = rand_vec(seed ^ 0xaa, c_out, -1.0, 1.0);
            let res = residual.then(|| rand_vec(seed ^ 0x33, c_out * oh * ow, -1.0, 1.0));
            let scale = 2.5 / 127.0; // clips the tails of x
            let layer = QConv2d::new(g, &wts, Some(&bias), act, scale).unwrap();
            let pool = ThreadPool::new(threads);
            let mut scratch = vec![0f32; layer.scratch_len(threads)];
            let mut y = vec![f32::NAN; c_out * oh * ow];
            layer.run(&pool, 1, &x, res.as_deref(), &mut y, &mut scratch);
            let mut want = vec![0f32; y.len()];
            reference_qconv2d(&g, &x, &wts, Some(&bias), res.as_deref(), act, scale, &mut want);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                // Integer products are exact; only the f32 epilogue rounds.
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "at {}: {} vs {}", i, a, b);
            }
            // And the INT8 layer approximates the float one: error bounded by
            // the quantization steps (half a step per operand per term),
            // plus what clipping x at ±2.5 removes.
            let mut fp = vec![0f32; y.len()];
            reference_conv2d(&g, &x.iter().map(|v| v.clamp(-2.5, 2.5)).collect::<Vec<_>>(), &wts, Some(&bias), act, &mut fp);
            if res.is_none() {
                let bound = (c_in * k * k) as f32 * (0.5 * scale * 1.0 + 0.5 / 127.0 * 2.5 + 0.25 * scale / 127.0) + 1e-4;
                for (a, b) in y.iter().zip(&fp) {
                    prop_assert!((a - b).abs() <= bound, "{} vs float {} (bound {})", a, b, bound);
                }
            }
        }

        #[test]
        fn int8_tensors_in_and_out_equal_the_reference(
            c_in in 1usize..12, c_out in 1usize..14, h in 1usize..12, w in 1usize..20,
            k in prop::sample::select(vec![1usize, 3, 5]), s in 1usize..3, p in 0usize..3,
            depthwise: bool,
            act in prop::sample::select(vec![Activation::None, Activation::Clip { lo: 0.0, hi: 6.0 }, Activation::HardSwish]),
            residual in any::<bool>(), threads in 1usize..4, seed in any::<u64>(),
            in_i8: bool, out_i8: bool, batch in 1usize..3,
        ) {
            let c_out = if depthwise { c_in } else { c_out };
            let g = geo(c_in, h, w, c_out, k, s, p, if depthwise { c_in } else { 1 });
            prop_assume!(g.out_h().unwrap_or(0) > 0 && g.out_w().unwrap_or(0) > 0);
            let (oh, ow) = (g.out_h().unwrap(), g.out_w().unwrap());
            let (in_img, out_img) = (c_in * h * w, c_out * oh * ow);
            let scale = 2.5 / 127.0;
            // Half the cases take non-negative inputs (as after a ReLU: the
            // kernel's unsigned form), half signed ones.
            let lo = if seed % 2 == 0 { 0.0 } else { -3.0 };
            let x = rand_vec(seed, batch * in_img, lo, 3.0);
            // INT8 input: the quantized values, and the f32 values they
            // stand for (which quantize back to them exactly).
            let xq: Vec<i8> = x.iter().map(|&v| quantize(v, 1.0 / scale) as i8).collect();
            let x_ref: Vec<f32> = if in_i8 { xq.iter().map(|&q| q as f32 * scale).collect() } else { x.clone() };
            let wts = rand_vec(seed ^ 0x55, c_out * (c_in / g.groups) * k * k, -1.0, 1.0);
            let bias = rand_vec(seed ^ 0xaa, c_out, -1.0, 1.0);
            let res = residual.then(|| rand_vec(seed ^ 0x33, batch * out_img, -1.0, 1.0));
            // The dot4 form (where this CPU has one) in most cases: on
            // AVX2, signed data under it must still be exact (the kernel's
            // signed form).
            let layer = QConv2d::new(g, &wts, Some(&bias), act, scale)
                .unwrap()
                .with_dot4(seed % 4 < 3);
            prop_assert_eq!(layer.dot4(), seed % 4 < 3 && dot4_kernel().is_some() && !layer.algorithm().contains("depthwise"));
            prop_assert_eq!(layer.algorithm() == "int8-depthwise", depthwise && c_in > 1);
            let pool = ThreadPool::new(threads);
            let mut scratch = vec![f32::NAN; layer.scratch_len(threads)];
            let mut want = vec![0f32; batch * out_img];
            for b in 0..batch {
                reference_qconv2d(
                    &g, &x_ref[b * in_img..(b + 1) * in_img], &wts, Some(&bias),
                    res.as_deref().map(|r| &r[b * out_img..(b + 1) * out_img]), act, scale,
                    &mut want[b * out_img..(b + 1) * out_img],
                );
            }
            let input = if in_i8 { QIn::I8(&xq) } else { QIn::F32(&x) };
            if out_i8 {
                let out_scale = 4.0 / 127.0;
                let mut y = vec![99i8; batch * out_img];
                layer.run_io(&pool, batch, input, res.as_deref(), QOut::I8(&mut y, out_scale), &mut scratch);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    // Within one step: the kernel's f32 epilogue (FMA) may
                    // round differently at a half-step boundary.
                    let q = quantize(*b, 1.0 / out_scale);
                    prop_assert!((*a as i16 - q).abs() <= 1, "at {}: {} vs {}", i, a, q);
                }
            } else {
                let mut y = vec![f32::NAN; batch * out_img];
                layer.run_io(&pool, batch, input, res.as_deref(), QOut::F32(&mut y), &mut scratch);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "at {}: {} vs {}", i, a, b);
                }
            }
        }
    }
}
