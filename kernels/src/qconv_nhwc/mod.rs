//! INT8 convolution, channels-last (NHWC): the INT8 twin of
//! [`crate::conv_nhwc`], so an INT8 engine can keep the channels-last layout
//! of the FP32 engine and pass INT8 tensors through whole inverted-residual
//! blocks (expand → depthwise → project).
//!
//! Same quantization as [`crate::qconv`]: weights symmetric per output
//! channel, the input symmetric per tensor, exact INT32 sums, and the
//! dequantization, bias, residual (f32), activation and — for an INT8
//! output — requantization with the consumer's scale fused into the
//! epilogue. Results equal [`crate::qconv::reference_qconv2d`]'s on the same
//! values in NHWC order, up to the rounding of the epilogue's fused
//! multiply-add (tested against [`reference_qconv2d_nhwc`], bit for bit).
//!
//! * **One group**: each task packs the input patches of up to [`PIX`]
//!   output pixels as unsigned bytes (`x + 128`; padding is `128`, a zero),
//!   reduction index `(ky·kw + kx)·c_in + ci`, rounded up to groups of four.
//!   The AVX-512 VNNI tile is 12 pixels × 32 output channels in 24 `zmm`
//!   accumulators: per group of four reduction indices, two weight loads
//!   (16 channels × 4 bytes each), one broadcast of each pixel's four bytes
//!   and one `vpdpbusd` per accumulator (64 products). The `+128` offset is
//!   removed exactly by starting each channel's sums at `-128 · Σ w`.
//!   Other CPUs run a portable tile with the same integer sums. On CPUs
//!   with AMX the layer has a second form ([`QConv2dNhwc::with_amx`]):
//!   tiles of 32 pixels × 32 channels, 16 384 products per `tdpbusd`
//!   (`tdpbssd` on a pointwise layer's INT8 input read in place), the same
//!   sums.
//! * **Depthwise** (multiplier 1): products of integer-valued floats, which
//!   are exact (|x·w| ≤ 127², and at most 1024 taps keep every partial sum
//!   below 2^24), so the f32 FMA form vectorised over channels gives the
//!   exact INT32 sums. Kernels of 5 taps per row or more, or 3 at stride
//!   2, run the `vpdpbusd` form instead where the CPU has VNNI and VBMI
//!   (`dwq`):
//!   each input row laid out once as four-column runs per channel, so one
//!   instruction sums four taps.

use crate::activation::Activation;
use crate::conv::Conv2dGeometry;
use crate::error::KernelError;
use crate::isa::{self, Isa};
use crate::pool::{Dst, SyncPtr, ThreadPool};
#[cfg(target_arch = "x86_64")]
use crate::qconv::QMAX;
use crate::qconv::{quantize, quantize_weights, QIn, QOut};

mod depthwise;
mod fused;
mod gemm;

use depthwise::DwQuads;

/// Output pixels per register tile.
const MR: usize = 12;
/// Output channels per weight block (one 512-bit register of `i32`).
const NB: usize = 16;
/// Longest reduction whose INT32 sums stay exact (`MAX_K · 127² < 2^31`).
const MAX_K: usize = 131_072;
/// Output pixels per task (a multiple of [`MR`]).
pub const PIX: usize = 48;
/// Output pixels per task of the AMX form (two pairs of 16-row tiles).
const PIX_AMX: usize = 64;
/// Depthwise maps of at most this many output pixels split their work by
/// channel blocks (larger ones by rows).
const SMALL_MAP: usize = 32 * 32;

/// A prepared channels-last INT8 convolution (one group or depthwise).
#[derive(Clone, Debug)]
pub struct QConv2dNhwc {
    g: Conv2dGeometry,
    oh: usize,
    ow: usize,
    /// Reduction length `kh·kw·c_in` (one group).
    k: usize,
    /// Groups of four reduction indices.
    kq: usize,
    /// Groups of four per packed row and per weight block: `kq`, or with
    /// AMX `kq` rounded up to whole tiles (16), zero weights past `kq`.
    wkq: usize,
    /// Whether the one-group form runs AMX tiles ([`isa::has_amx_int8`]).
    amx: bool,
    /// Blocks of [`NB`] output channels.
    cblocks: usize,
    /// One group: `[cblocks][wkq][NB][4]`, zero-padded.
    w: Vec<i8>,
    /// One group: `-128 · Σ_k w[c][k]` per (padded) output channel.
    comp: Vec<i32>,
    /// Depthwise: integer-valued weights `[kh·kw][c]`.
    dw: Option<Vec<f32>>,
    /// Depthwise without dilation: the weights for the VNNI form.
    dwq: Option<DwQuads>,
    /// `weight_scale[c] · input_scale`, padded to `cblocks · NB`.
    scale: Vec<f32>,
    /// Bias, padded to `cblocks · NB`.
    bias: Vec<f32>,
    act: Activation,
    input_scale: f32,
    inv_input_scale: f32,
    weight_scales: Vec<f32>,
}

impl QConv2dNhwc {
    /// Whether this kernel runs `g`: one group, or depthwise with
    /// multiplier 1 and at most 1024 taps.
    pub fn supports(g: &Conv2dGeometry) -> bool {
        (g.groups == 1 || (g.is_depthwise() && g.kh * g.kw <= 1024))
            && g.out_h().is_some_and(|h| h > 0)
            && g.out_w().is_some_and(|w| w > 0)
    }

    /// Quantizes `weights` (`[c_out, c_in/groups, kh, kw]`, ONNX order) per
    /// output channel for inputs quantized with `input_scale`.
    pub fn new(
        g: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
        input_scale: f32,
    ) -> Result<QConv2dNhwc, KernelError> {
        let bad = |detail: String| KernelError::Unsupported {
            kernel: "qconv2d-nhwc",
            detail,
        };
        if !Self::supports(&g) {
            return Err(bad(format!(
                "{} groups, {}x{} kernel: channels-last INT8 takes one group or a depthwise layer of at most 1024 taps",
                g.groups, g.kh, g.kw
            )));
        }
        if !(input_scale.is_finite() && input_scale > 0.0) {
            return Err(bad(format!("input scale {input_scale} is not positive")));
        }
        let (oh, ow) = g.validate("qconv2d-nhwc")?;
        // |Σ x·w| ≤ k·127² must fit INT32 exactly.
        let k_total = g.c_in / g.groups.max(1) * g.kh * g.kw;
        if k_total > MAX_K {
            return Err(bad(format!(
                "reduction of {k_total} products: INT8 sums are exact up to {MAX_K}"
            )));
        }
        let b = g.checked_bias(["qconv2d-nhwc weights", "qconv2d-nhwc bias"], weights, bias)?;
        let (weight_scales, q) = quantize_weights(weights, g.c_out);
        let cblocks = g.c_out.div_ceil(NB);
        let padded = cblocks * NB;
        let mut scale = vec![0f32; padded];
        let mut bias = vec![0f32; padded];
        for c in 0..g.c_out {
            scale[c] = weight_scales[c] * input_scale;
            bias[c] = b[c];
        }
        let taps = g.kh * g.kw;
        let (k, kq, wkq, w, comp, dw) = if g.groups == 1 {
            let k = taps * g.c_in;
            let kq = k.div_ceil(4);
            let wkq = kq;
            let mut w = vec![0i8; cblocks * wkq * NB * 4];
            let mut comp = vec![0i32; padded];
            for co in 0..g.c_out {
                let (blk, lane) = (co / NB, co % NB);
                let mut sum = 0i32;
                for ci in 0..g.c_in {
                    for t in 0..taps {
                        let v = q[(co * g.c_in + ci) * taps + t];
                        let kk = t * g.c_in + ci;
                        w[((blk * wkq + kk / 4) * NB + lane) * 4 + kk % 4] = v;
                        sum += v as i32;
                    }
                }
                comp[co] = -128 * sum;
            }
            (k, kq, wkq, w, comp, None)
        } else {
            let mut dw = vec![0f32; taps * g.c_out];
            for c in 0..g.c_out {
                for t in 0..taps {
                    dw[t * g.c_out + c] = q[c * taps + t] as f32;
                }
            }
            (taps, 0, 0, Vec::new(), Vec::new(), Some(dw))
        };
        // Built only where it runs.
        let dwq = if dw.is_some() && isa::has_vnni_vbmi() {
            DwQuads::new(&g, &q, cblocks)
        } else {
            None
        };
        Ok(QConv2dNhwc {
            g,
            oh,
            ow,
            k,
            kq,
            wkq,
            amx: false,
            cblocks,
            w,
            comp,
            dw,
            dwq,
            scale,
            bias,
            act,
            input_scale,
            inv_input_scale: 1.0 / input_scale,
            weight_scales,
        })
    }

    /// The geometry (`c_in`, `h`, `w` of the NHWC input).
    pub fn geometry(&self) -> &Conv2dGeometry {
        &self.g
    }

    /// Output (height, width).
    pub fn out_hw(&self) -> (usize, usize) {
        (self.oh, self.ow)
    }

    /// The input scale the layer quantizes with.
    pub fn input_scale(&self) -> f32 {
        self.input_scale
    }

    /// Per-output-channel weight scales.
    pub fn weight_scales(&self) -> &[f32] {
        &self.weight_scales
    }

    /// Bytes of packed weights held.
    pub fn weight_bytes(&self) -> usize {
        self.w.len()
            + self.comp.len() * 4
            + self.dw.as_ref().map_or(0, |w| w.len() * 4)
            + self.dwq.as_ref().map_or(0, DwQuads::bytes)
    }

    /// Name for reports and the tactic name: `int8-nhwc-depthwise`,
    /// `int8-nhwc-gemm`, or `int8-nhwc-gemm-amx` (the AMX form, see
    /// [`QConv2dNhwc::with_amx`]).
    pub fn algorithm(&self) -> &'static str {
        if self.dw.is_some() {
            "int8-nhwc-depthwise"
        } else if self.amx {
            "int8-nhwc-gemm-amx"
        } else {
            "int8-nhwc-gemm"
        }
    }

    /// The one-group layer on AMX tiles (`on`) where this CPU and OS
    /// allow them ([`isa::has_amx_int8`]), or on the VNNI (or portable)
    /// tile: the same integer sums, so the same results; which is faster
    /// depends on the shape (AMX wins on long reductions, loses where the
    /// layer is bound by its epilogue or memory), so the tuner times both.
    /// Depthwise layers, and `on` where AMX is missing, are unchanged.
    pub fn with_amx(mut self, on: bool) -> QConv2dNhwc {
        let on = on && self.dw.is_none() && isa::has_amx_int8();
        if on == self.amx {
            return self;
        }
        // AMX reads whole tiles of 16 groups: rows and weight blocks
        // padded with zero weights.
        let wkq = if on {
            self.kq.next_multiple_of(16)
        } else {
            self.kq
        };
        let mut w = vec![0i8; self.cblocks * wkq * NB * 4];
        let run = self.kq * NB * 4;
        for b in 0..self.cblocks {
            let from = b * self.wkq * NB * 4;
            w[b * wkq * NB * 4..][..run].copy_from_slice(&self.w[from..from + run]);
        }
        self.w = w;
        self.wkq = wkq;
        self.amx = on;
        self
    }

    /// Whether this layer runs AMX tiles.
    pub fn amx(&self) -> bool {
        self.amx
    }

    /// The instructions the one-group tile runs on this CPU.
    pub fn tile_kernel() -> &'static str {
        if isa::has_amx_int8() {
            "vpdpbusd zmm, or AMX tdpbusd/tdpbssd where tuned"
        } else if vnni() {
            "vpdpbusd zmm"
        } else {
            "portable"
        }
    }

    /// Bytes of scratch per thread.
    fn slot_bytes(&self) -> usize {
        match &self.dw {
            // One output row of f32 sums and the input rows one output
            // row reads, as f32 values; or the VNNI form's buffers.
            Some(_) => ((self.ow * self.g.c_out + self.window() * self.padded_row()) * 4)
                .max(self.dwq.as_ref().map_or(0, |_| self.quad_offsets().3)),
            None => self.pix() * self.row(),
        }
    }

    /// Depthwise, VNNI form: byte offsets in a thread's slot of the
    /// staging row (`[cblocks][pcols + 3][NB]` unsigned bytes), the row
    /// quantized from f32 input, and the ring of quad rows
    /// (`[window][pcols][cblocks][NB][4]`: each column's four-column run
    /// per channel), and the bytes in all. The slot starts with the
    /// output row's corrections (`cblocks · NB` i32).
    fn quad_offsets(&self) -> (usize, usize, usize, usize) {
        let g = &self.g;
        let up = |b: usize| b.div_ceil(64) * 64;
        let pcols = g.pads[1] + g.w + g.pads[3];
        let stage = self.cblocks * NB * 4;
        let q8 = stage + up(self.cblocks * (pcols + 3) * NB);
        let ring = q8 + up(g.w * g.c_in);
        (
            stage,
            q8,
            ring,
            ring + self.window() * pcols * self.cblocks * 64,
        )
    }

    /// The channels `c0..c1` of channel blocks `blocks` (the last block
    /// may be partial).
    fn block_chans(&self, blocks: &std::ops::Range<usize>) -> (usize, usize) {
        (blocks.start * NB, (blocks.end * NB).min(self.g.c_out))
    }

    /// One group: bytes of one packed pixel row (`wkq` groups of four).
    fn row(&self) -> usize {
        self.wkq * 4
    }

    /// One group: output pixels per task ([`PIX`], or [`PIX_AMX`] for
    /// the AMX form).
    fn pix(&self) -> usize {
        if self.amx {
            PIX_AMX
        } else {
            PIX
        }
    }

    /// A 1×1 kernel at stride 1 without padding: the input's pixel rows
    /// are the GEMM's rows.
    fn pointwise(&self) -> bool {
        let g = &self.g;
        g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.pads == [0; 4]
    }

    /// Depthwise: floats of one input row with its pad columns.
    fn padded_row(&self) -> usize {
        (self.g.pads[1] + self.g.w + self.g.pads[3]) * self.g.c_in
    }

    /// Depthwise: input rows one output row reads.
    fn window(&self) -> usize {
        (self.g.kh - 1) * self.g.dilation[0] + 1
    }

    /// Scratch f32 elements [`QConv2dNhwc::run_io`] needs on a pool of
    /// `threads`.
    pub fn scratch_len(&self, threads: usize) -> usize {
        // 16 floats of slack to start the slots on a cache line.
        self.shared_floats() + threads.max(1) * self.slot_bytes().div_ceil(64) * 16 + 16
    }

    /// One group: scratch floats holding an f32 input image quantized to
    /// INT8 (once, before the tasks pack it).
    fn shared_floats(&self) -> usize {
        match self.dw {
            Some(_) => 0,
            None => (self.g.h * self.g.w * self.g.c_in).div_ceil(64) * 16,
        }
    }

    /// Runs `batch` images: `input` `[batch, h, w, c_in]` (f32, quantized
    /// as it is read, or INT8 with this layer's input scale), `output`
    /// `[batch, oh, ow, c_out]` (f32, or INT8 requantized with the given
    /// scale); `residual` (output-shaped, f32) is added before the
    /// activation.
    ///
    /// # Panics
    /// If a buffer is shorter than the geometry needs (the engine checks
    /// sizes when it plans memory).
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
        let in_img = g.h * g.w * g.c_in;
        let out_img = self.oh * self.ow * g.c_out;
        let in_len = match input {
            QIn::F32(x) => x.len(),
            QIn::I8(x) => x.len(),
        };
        let (out_len, dst) = match output {
            QOut::F32(y) => (y.len(), Dst::F32(SyncPtr::new(y))),
            QOut::I8(y, s) => (y.len(), Dst::I8(SyncPtr::new(y), 1.0 / s)),
        };
        assert!(in_len >= batch * in_img && out_len >= batch * out_img);
        assert!(residual.is_none_or(|r| r.len() >= batch * out_img));
        assert!(scratch.len() >= self.scratch_len(pool.threads()));
        let slot_f32 = self.slot_bytes().div_ceil(64) * 16;
        let (shared, scratch) = scratch.split_at_mut(self.shared_floats());
        // SAFETY: the shared floats viewed as bytes (4 per float).
        let shared = unsafe {
            std::slice::from_raw_parts_mut(shared.as_mut_ptr() as *mut i8, shared.len() * 4)
        };
        // Slots start on a cache line (64-byte stores of widened rows
        // would otherwise split lines).
        let skip = scratch.as_ptr().align_offset(64).min(16);
        let s_ptr = SyncPtr::new(&mut scratch[skip..]);
        for b in 0..batch {
            let x = match input {
                QIn::F32(x) => QIn::F32(&x[b * in_img..(b + 1) * in_img]),
                QIn::I8(x) => QIn::I8(&x[b * in_img..(b + 1) * in_img]),
            };
            let res = residual.map(|r| &r[b * out_img..(b + 1) * out_img]);
            // SAFETY: image b's output starts at b·out_img < out_len.
            let y = unsafe {
                match dst {
                    Dst::F32(p) => Dst::F32(SyncPtr(p.add(b * out_img))),
                    Dst::I8(p, inv) => Dst::I8(SyncPtr(p.add(b * out_img)), inv),
                }
            };
            let slot = |s: usize| {
                // SAFETY: each thread slot owns a disjoint window of
                // `slot_f32` floats of scratch (sized by `scratch_len` for
                // the pool's thread count).
                unsafe { std::slice::from_raw_parts_mut(s_ptr.add(s * slot_f32), slot_f32) }
            };
            if let Some(w) = &self.dw {
                let threads = pool.threads();
                let cbs = self.cblocks;
                if self.oh * self.ow <= SMALL_MAP && cbs >= threads {
                    // A small map: tasks of channel blocks over all rows,
                    // a few per thread. Row tasks would be few and uneven
                    // (7 rows on 2 threads: 4 + 3), and each would lay
                    // out the rows of its window again (on a 7x7 map with
                    // a 5x5 kernel, 5 rows for 1 or 2).
                    let parts = cbs.min(4 * threads);
                    pool.run(parts, &|t, s| {
                        let blocks = t * cbs / parts..(t + 1) * cbs / parts;
                        self.depthwise_rows(w, x, res, y, 0..self.oh, blocks, slot(s));
                    });
                } else {
                    // Tasks of output rows, a few per thread.
                    let rows_per = self.oh.div_ceil(4 * threads).max(1);
                    let tasks = self.oh.div_ceil(rows_per);
                    pool.run(tasks, &|t, s| {
                        let r0 = t * rows_per;
                        let r1 = (r0 + rows_per).min(self.oh);
                        self.depthwise_rows(w, x, res, y, r0..r1, 0..cbs, slot(s));
                    });
                }
                continue;
            }
            // An f32 input is quantized once, split over the pool.
            let x = self.image_i8(pool, x, shared);
            let ohw = self.oh * self.ow;
            let pix = self.pix();
            let chunks = ohw.div_ceil(pix);
            let pairs = self.cblocks.div_ceil(2);
            // Few pixels (late, small layers): split the channels as well.
            let parts = if chunks >= 2 * pool.threads() {
                1
            } else {
                pool.threads().min(pairs).max(1)
            };
            pool.run(chunks * parts, &|t, s| {
                let (chunk, part) = (t / parts, t % parts);
                let p0 = chunk * pix;
                let n = pix.min(ohw - p0);
                let buf = slot(s);
                // SAFETY: the slot's floats viewed as bytes (4 per float).
                let packed = unsafe {
                    std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, buf.len() * 4)
                };
                let (c0, c1) = (part * pairs / parts * 2, (part + 1) * pairs / parts * 2);
                let blocks = c0..c1.min(self.cblocks);
                #[cfg(target_arch = "x86_64")]
                if self.amx && self.pointwise() {
                    // AMX tiles read a pointwise layer's rows in place.
                    let clamp = crate::gemm::in_register_clamp(self.act);
                    let rows = gemm::amx::Rows::Direct { x, spare: packed };
                    // SAFETY: `amx` is set only where `isa::has_amx_int8`
                    // holds; the slot holds `pix` padded rows; the epilogue
                    // writes this task's own pixels and channels.
                    unsafe { gemm::amx::chunk(self, rows, p0, n, blocks, res, y, clamp) };
                    return;
                }
                self.pack(x, p0, n, packed);
                self.gemm_chunk(packed, p0, n, blocks, res, y);
            });
        }
    }

    /// One input image as INT8: `x` itself, or an f32 image quantized
    /// with this layer's input scale into `shared` (split over the pool).
    fn image_i8<'a>(&self, pool: &ThreadPool, x: QIn<'a>, shared: &'a mut [i8]) -> &'a [i8] {
        match x {
            QIn::I8(x) => x,
            QIn::F32(xf) => {
                const QCHUNK: usize = 16 * 1024;
                let n = xf.len();
                let q = &mut shared[..n];
                let qp = SyncPtr::new(q);
                let isa = isa::active();
                pool.run(n.div_ceil(QCHUNK), &|t, _| {
                    let (lo, hi) = (t * QCHUNK, ((t + 1) * QCHUNK).min(n));
                    // SAFETY: each task writes its own range.
                    let d = unsafe { std::slice::from_raw_parts_mut(qp.add(lo), hi - lo) };
                    crate::int8::quantize_to_i8(isa, &xf[lo..hi], self.inv_input_scale, d);
                });
                q
            }
        }
    }

    /// The portable epilogue: `v` holds the sums of whole pixels' channels
    /// `ch` (one run of `ch.len()` per pixel), written from output element
    /// `o` on; `res` (if any) is the residual from `o` on.
    fn finish(
        &self,
        isa: Isa,
        v: &mut [f32],
        ch: std::ops::Range<usize>,
        res: Option<&[f32]>,
        y: Dst,
        o: usize,
    ) {
        let n = ch.len();
        let (scale, bias) = (&self.scale[ch.clone()], &self.bias[ch]);
        for (px, vp) in v.chunks_exact_mut(n).enumerate() {
            let r = res.map(|r| &r[px * n..(px + 1) * n]);
            affine_row(isa, vp, scale, bias, r);
        }
        self.act.apply_slice(v);
        match y {
            // SAFETY: the caller owns output elements o..o+len.
            Dst::F32(p) => unsafe {
                std::slice::from_raw_parts_mut(p.add(o), v.len()).copy_from_slice(v)
            },
            Dst::I8(p, inv) => {
                // SAFETY: as above.
                let out = unsafe { std::slice::from_raw_parts_mut(p.add(o), v.len()) };
                crate::int8::quantize_to_i8(isa, v, inv, out);
            }
        }
    }
}

/// Whether the VNNI tile runs.
fn vnni() -> bool {
    isa::has_vnni()
}

/// `v = v · scale + bias (+ r)` with a fused multiply-add.
fn affine_row(isa: Isa, v: &mut [f32], scale: &[f32], bias: &[f32], r: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 and FMA are present.
        unsafe { affine_row_fma(v, scale, bias, r) };
        return;
    }
    let _ = isa;
    affine_row_body(v, scale, bias, r);
}

#[inline(always)]
fn affine_row_body(v: &mut [f32], scale: &[f32], bias: &[f32], r: Option<&[f32]>) {
    for ((x, &s), &b) in v.iter_mut().zip(scale).zip(bias) {
        *x = x.mul_add(s, b);
    }
    if let Some(r) = r {
        v.iter_mut().zip(r).for_each(|(x, &r)| *x += r);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn affine_row_fma(v: &mut [f32], scale: &[f32], bias: &[f32], r: Option<&[f32]>) {
    affine_row_body(v, scale, bias, r)
}

/// Where one tile's epilogue writes.
struct Epi<'a> {
    layer: &'a QConv2dNhwc,
    /// First output pixel of the tile.
    pix: usize,
    res: Option<&'a [f32]>,
    y: Dst,
}

impl Epi<'_> {
    /// Portable epilogue of pixel `pix + r`, channel block `b` (sums in
    /// `v`, as f32).
    fn finish_scalar(&self, r: usize, b: usize, v: &mut [f32; NB]) {
        let l = self.layer;
        let c0 = b * NB;
        let lanes = NB.min(l.g.c_out - c0);
        let o = (self.pix + r) * l.g.c_out + c0;
        let res = self.res.map(|res| &res[o..o + lanes]);
        l.finish(
            isa::active(),
            &mut v[..lanes],
            c0..c0 + lanes,
            res,
            self.y,
            o,
        );
    }
}

/// The AVX-512 epilogue shared by both INT8 channels-last forms.
#[cfg(target_arch = "x86_64")]
mod epi512 {
    use super::*;
    use std::arch::x86_64::*;

    /// `act(sum · scale + bias (+ residual))` of one block of 16 channels
    /// (fewer at the end) from `c0`, for `sums.len()` pixels whose outputs
    /// start at `o0 + j · step` (`o0` includes `c0`), stored as f32 or
    /// requantized. Everything that is the same for the block (scale,
    /// bias, mask, bounds, the output form) is decided once, not once per
    /// pixel; an activation that is not a clamp runs once over all the
    /// block's sums.
    ///
    /// A call from the VNNI tile (its twelve row counts share this one
    /// copy); the depthwise kernel inlines [`block_inline`] instead.
    ///
    /// # Safety
    /// As [`block_inline`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn block(
        l: &QConv2dNhwc,
        sums: &mut [__m512],
        o0: usize,
        step: usize,
        c0: usize,
        res: Option<&[f32]>,
        y: Dst,
        clamp: Option<(f32, f32)>,
    ) {
        // SAFETY: forwarded contract; AVX-512 is enabled here.
        unsafe { block_inline(l, sums, o0, step, c0, res, y, clamp) }
    }

    /// [`block`]'s body, always inlined: inside the depthwise kernel
    /// (which enables AVX-512) the sums stay in registers and their count
    /// is a constant; as a call it spilled every sum and cost about a
    /// tenth of a depthwise layer. It enables no target feature itself
    /// (that and `inline(always)` do not go together); its intrinsics
    /// inline once it sits in its caller.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be present; output (and residual) elements
    /// `o0 + j · step ..+lanes` must be valid and the caller's own.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn block_inline(
        l: &QConv2dNhwc,
        sums: &mut [__m512],
        o0: usize,
        step: usize,
        c0: usize,
        res: Option<&[f32]>,
        y: Dst,
        clamp: Option<(f32, f32)>,
    ) {
        let lanes = NB.min(l.g.c_out - c0);
        let full = lanes == NB;
        let mask: __mmask16 = if full { 0xffff } else { (1u16 << lanes) - 1 };
        // SAFETY: scale and bias are padded to whole blocks; the residual
        // and output lanes under `mask` are the caller's.
        unsafe {
            let s = _mm512_loadu_ps(l.scale.as_ptr().add(c0));
            let bias = _mm512_loadu_ps(l.bias.as_ptr().add(c0));
            let rp = res.map(|r| r.as_ptr().add(o0));
            // sum · scale + bias (+ residual) of pixel j. Macros, not
            // closures: a closure does not inherit the caller's target
            // features, and its intrinsics would become calls.
            macro_rules! affine {
                ($j:expr, $v:expr) => {{
                    let v = _mm512_fmadd_ps($v, s, bias);
                    match rp {
                        Some(rp) => {
                            _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, rp.add($j * step)))
                        }
                        None => v,
                    }
                }};
            }
            // An INT8 output with a clamp activation clamps once:
            // `clamp(v, lo, hi) · inv` is `clamp(v · inv, lo · inv, hi ·
            // inv)` exactly (the rounded product is monotonic in v, inv >
            // 0), and the rounding bounds ±127 fold into those bounds
            // (unless they cross: NaN, or lo > hi). `scaled` bounds are
            // those; otherwise `sums` end as the f32 results.
            let mut scaled = None;
            match clamp {
                Some((lo, hi)) => {
                    scaled = match y {
                        Dst::I8(_, inv) => Some(((lo * inv).max(-QMAX), (hi * inv).min(QMAX)))
                            .filter(|(a, b)| a <= b),
                        Dst::F32(_) => None,
                    };
                    match (scaled, y) {
                        (Some(_), Dst::I8(_, inv)) => {
                            let inv = _mm512_set1_ps(inv);
                            for j in 0..sums.len() {
                                sums[j] = _mm512_mul_ps(affine!(j, sums[j]), inv);
                            }
                        }
                        _ => {
                            let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
                            for j in 0..sums.len() {
                                sums[j] = _mm512_min_ps(_mm512_max_ps(affine!(j, sums[j]), lo), hi);
                            }
                        }
                    }
                }
                None => {
                    for j in 0..sums.len() {
                        sums[j] = affine!(j, sums[j]);
                    }
                    // The vectors as one run of floats (lanes past `lanes`
                    // are computed and never stored).
                    let f = std::slice::from_raw_parts_mut(
                        sums.as_mut_ptr() as *mut f32,
                        sums.len() * NB,
                    );
                    l.act.apply_slice(f);
                }
            }
            // The stores: one pass, the values stay in registers.
            match y {
                Dst::F32(p) => {
                    let p = p.add(o0);
                    for j in 0..sums.len() {
                        if full {
                            _mm512_storeu_ps(p.add(j * step), sums[j]);
                        } else {
                            _mm512_mask_storeu_ps(p.add(j * step), mask, sums[j]);
                        }
                    }
                }
                Dst::I8(p, inv) => {
                    let p = p.add(o0);
                    let (lo, hi) = match scaled {
                        Some(b) => b,
                        None => {
                            let inv = _mm512_set1_ps(inv);
                            for v in sums.iter_mut() {
                                *v = _mm512_mul_ps(*v, inv);
                            }
                            (-QMAX, QMAX)
                        }
                    };
                    let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
                    macro_rules! q {
                        ($v:expr) => {
                            _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps($v, lo), hi))
                        };
                    }
                    let mut j = 0;
                    if full {
                        // Four pixels at a time: two rounds of packs put
                        // each pixel's 4 bytes of every 128-bit lane side
                        // by side, one dword permute gathers each pixel's
                        // 16 bytes into a lane.
                        let idx =
                            _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
                        while j + 4 <= sums.len() {
                            let ab = _mm512_packs_epi32(q!(sums[j]), q!(sums[j + 1]));
                            let cd = _mm512_packs_epi32(q!(sums[j + 2]), q!(sums[j + 3]));
                            let t = _mm512_permutexvar_epi32(idx, _mm512_packs_epi16(ab, cd));
                            let d = p.add(j * step);
                            _mm_storeu_si128(d as *mut __m128i, _mm512_castsi512_si128(t));
                            _mm_storeu_si128(
                                d.add(step) as *mut __m128i,
                                _mm512_extracti32x4_epi32::<1>(t),
                            );
                            _mm_storeu_si128(
                                d.add(2 * step) as *mut __m128i,
                                _mm512_extracti32x4_epi32::<2>(t),
                            );
                            _mm_storeu_si128(
                                d.add(3 * step) as *mut __m128i,
                                _mm512_extracti32x4_epi32::<3>(t),
                            );
                            j += 4;
                        }
                    }
                    while j < sums.len() {
                        let b = _mm512_cvtepi32_epi8(q!(sums[j]));
                        if full {
                            _mm_storeu_si128(p.add(j * step) as *mut __m128i, b);
                        } else {
                            _mm_mask_storeu_epi8(p.add(j * step), mask, b);
                        }
                        j += 1;
                    }
                }
            }
        }
    }
}

/// Plain-loop reference (one image, NHWC in and out): the layer's
/// quantization, sums in `i64`, then `act(sum·s_w·s_x + bias (+ residual))`
/// with the multiply-add fused and the activation's slice form
/// ([`Activation::apply_fast`]), as the kernels compute them; `out_scale`
/// requantizes the result (returned as the integer values, as f32).
#[allow(clippy::too_many_arguments)]
pub fn reference_qconv2d_nhwc(
    g: &Conv2dGeometry,
    x: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Activation,
    input_scale: f32,
    out_scale: Option<f32>,
    y: &mut [f32],
) {
    let (oh, ow) = (g.out_h().unwrap_or(0), g.out_w().unwrap_or(0));
    let (ws, wq) = quantize_weights(weights, g.c_out);
    let groups = g.groups.max(1);
    let (cin_g, cout_g) = (g.c_in / groups, g.c_out / groups);
    let inv = 1.0 / input_scale;
    for oy in 0..oh {
        for ox in 0..ow {
            for co in 0..g.c_out {
                let first = co / cout_g.max(1) * cin_g;
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
                            let xv = x[(iy as usize * g.w + ix as usize) * g.c_in + ci];
                            let wv = wq[((co * cin_g + ci - first) * g.kh + ky) * g.kw + kx];
                            acc += quantize(xv, inv) as i64 * wv as i64;
                        }
                    }
                }
                let o = (oy * ow + ox) * g.c_out + co;
                let mut v = (acc as f32).mul_add(ws[co] * input_scale, bias.map_or(0.0, |b| b[co]));
                if let Some(r) = residual {
                    v += r[o];
                }
                let v = act.apply_fast(v);
                y[o] = match out_scale {
                    Some(s) => quantize(v, 1.0 / s) as f32,
                    None => v,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[allow(clippy::too_many_arguments)]
    fn geo(
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Conv2dGeometry {
        Conv2dGeometry {
            c_in,
            h,
            w,
            c_out,
            kh: k,
            kw: k,
            stride: [stride; 2],
            pads: [pad; 4],
            dilation: [1; 2],
            groups,
        }
    }

    impl QConv2dNhwc {
        /// The layer without its VNNI depthwise form.
        fn without_quads(mut self) -> QConv2dNhwc {
            self.dwq = None;
            self
        }

        /// The layer on the VNNI tile with the AMX form's padded rows
        /// and weights (what a layer switched by `with_amx` must not
        /// depend on).
        fn padded_without_amx(mut self) -> QConv2dNhwc {
            self.amx = false;
            self
        }
    }

    /// Runs the layer every way (f32 / INT8 input, f32 / INT8 output) on
    /// pools of 1 and 3 threads and compares with the reference, bit for bit.
    fn check(g: Conv2dGeometry, act: Activation, residual: bool, seed: u64) {
        let taps = g.kh * g.kw;
        let wlen = g.c_out * g.c_in / g.groups * taps;
        let w = rand_vec(seed, wlen, -1.0, 1.0);
        let bias = rand_vec(seed + 1, g.c_out, -0.5, 0.5);
        let x = rand_vec(seed + 2, g.h * g.w * g.c_in, -2.0, 2.0);
        let in_scale = 2.0 / 127.0;
        let l = QConv2dNhwc::new(g, &w, Some(&bias), act, in_scale).unwrap();
        let (oh, ow) = l.out_hw();
        let n = oh * ow * g.c_out;
        let r = rand_vec(seed + 3, n, -1.0, 1.0);
        let res = residual.then_some(&r[..]);
        // INT8 input: the same values, quantized first.
        let x8: Vec<i8> = x
            .iter()
            .map(|&v| quantize(v, 1.0 / in_scale) as i8)
            .collect();
        let out_scale = 0.05f32;
        let mut want = vec![0f32; n];
        reference_qconv2d_nhwc(&g, &x, &w, Some(&bias), res, act, in_scale, None, &mut want);
        let mut want8 = vec![0f32; n];
        reference_qconv2d_nhwc(
            &g,
            &x,
            &w,
            Some(&bias),
            res,
            act,
            in_scale,
            Some(out_scale),
            &mut want8,
        );
        // The VNNI depthwise form where this CPU runs it, and the f32 form
        // it replaces there (which other CPUs run); the AMX tile where it
        // runs, and the VNNI tile it replaces there.
        let forms = [
            Some(l.clone()),
            l.dwq.is_some().then(|| l.clone().without_quads()),
            Some(l.clone().with_amx(true)).filter(QConv2dNhwc::amx),
            Some(l.clone().with_amx(true).padded_without_amx()).filter(|l| l.wkq != l.kq),
        ];
        for (l, threads) in forms.iter().flatten().flat_map(|l| [(l, 1), (l, 3)]) {
            let pool = ThreadPool::new(threads);
            let mut scratch = vec![0f32; l.scratch_len(threads)];
            for in8 in [false, true] {
                let input = if in8 { QIn::I8(&x8) } else { QIn::F32(&x) };
                let mut y = vec![f32::NAN; n];
                l.run_io(&pool, 1, input, res, QOut::F32(&mut y), &mut scratch);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        a == b,
                        "{g:?} {act:?} in8 {in8} t{threads}: y[{i}] {a} != {b}"
                    );
                }
                let mut y8 = vec![0i8; n];
                l.run_io(
                    &pool,
                    1,
                    input,
                    res,
                    QOut::I8(&mut y8, out_scale),
                    &mut scratch,
                );
                for (i, (&a, &b)) in y8.iter().zip(&want8).enumerate() {
                    assert!(
                        a as f32 == b,
                        "{g:?} in8 {in8} t{threads}: q[{i}] {a} != {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn pointwise_matches_reference() {
        check(geo(16, 9, 11, 24, 1, 1, 0, 1), Activation::None, false, 1);
        // Reductions of several AMX tiles with a partial last one, an odd
        // channel block count, rows read in place and copied at the end.
        check(geo(150, 7, 9, 40, 1, 1, 0, 1), Activation::Relu, true, 4);
        check(geo(64, 6, 6, 16, 1, 1, 0, 1), Activation::None, false, 5);
        check(geo(32, 7, 7, 48, 1, 1, 0, 1), Activation::Relu, true, 2);
        check(
            geo(13, 5, 6, 35, 1, 1, 0, 1),
            Activation::Clip { lo: 0.0, hi: 6.0 },
            false,
            3,
        );
        check(
            geo(40, 14, 14, 16, 1, 1, 0, 1),
            Activation::HardSwish,
            true,
            4,
        );
    }

    #[test]
    fn spatial_kernels_match_reference() {
        check(geo(3, 17, 19, 16, 3, 2, 1, 1), Activation::Relu, false, 5);
        check(geo(8, 9, 9, 33, 3, 1, 1, 1), Activation::Silu, true, 6);
        check(geo(5, 8, 8, 7, 5, 2, 2, 1), Activation::None, false, 7);
    }

    #[test]
    fn depthwise_matches_reference() {
        check(geo(24, 13, 13, 24, 3, 1, 1, 24), Activation::Relu, false, 8);
        check(
            geo(40, 12, 12, 40, 5, 2, 2, 40),
            Activation::Clip { lo: 0.0, hi: 6.0 },
            true,
            9,
        );
        check(
            geo(17, 7, 9, 17, 3, 2, 1, 17),
            Activation::HardSwish,
            false,
            10,
        );
        // Asymmetric padding (TF "SAME" with stride 2) and a dilation.
        let mut g = geo(32, 10, 11, 32, 3, 2, 0, 32);
        g.pads = [0, 0, 1, 1];
        check(g, Activation::Relu, false, 11);
        let mut g = geo(20, 12, 12, 20, 3, 1, 2, 20);
        g.dilation = [2, 2];
        check(g, Activation::None, true, 12);
        let mut g = geo(16, 9, 9, 16, 3, 1, 2, 1);
        g.dilation = [2, 2];
        check(g, Activation::None, false, 13);
        // Rows of 7, 10 and 11 pixels: groups of 7, 8 + 2 and 8 + 3.
        check(
            geo(48, 5, 7, 48, 5, 1, 2, 48),
            Activation::Clip { lo: 0.0, hi: 6.0 },
            true,
            14,
        );
        check(geo(20, 4, 10, 20, 3, 1, 1, 20), Activation::Relu, false, 15);
        check(geo(36, 3, 11, 36, 3, 1, 1, 36), Activation::None, true, 16);
        // The VNNI form (5 taps per row and more at stride 1): a partial
        // channel block, asymmetric padding, two and three quads a row.
        check(geo(20, 9, 9, 20, 5, 1, 2, 20), Activation::Relu, true, 17);
        let mut g = geo(33, 8, 10, 33, 7, 1, 3, 33);
        g.pads = [2, 3, 4, 1];
        check(g, Activation::HardSwish, false, 18);
        check(
            geo(16, 12, 12, 16, 9, 1, 4, 16),
            Activation::None,
            false,
            19,
        );
        // Small maps on 3 threads split by channel blocks (7 blocks, the
        // last partial, in 7 tasks).
        check(
            geo(100, 6, 6, 100, 3, 1, 1, 100),
            Activation::Relu,
            true,
            20,
        );
        check(
            geo(100, 6, 5, 100, 5, 1, 2, 100),
            Activation::None,
            false,
            21,
        );
        check(
            geo(100, 9, 9, 100, 3, 2, 1, 100),
            Activation::HardSwish,
            true,
            22,
        );
    }

    /// The tiers agree: the portable tile against the VNNI one (each
    /// checked against the reference above; here on the largest sums).
    #[test]
    fn extreme_values_are_exact() {
        // Every input at ±127 after quantization and every weight at ±127:
        // the largest sums the kernel can form.
        let g = geo(64, 4, 4, 32, 3, 1, 1, 1);
        let w: Vec<f32> = (0..32 * 64 * 9)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let x: Vec<f32> = (0..16 * 64)
            .map(|i| if i % 5 == 0 { -9.0 } else { 9.0 })
            .collect();
        let l = QConv2dNhwc::new(g, &w, None, Activation::None, 1.0 / 127.0).unwrap();
        let mut want = vec![0f32; 16 * 32];
        reference_qconv2d_nhwc(
            &g,
            &x,
            &w,
            None,
            None,
            Activation::None,
            1.0 / 127.0,
            None,
            &mut want,
        );
        let pool = ThreadPool::new(1);
        let mut scratch = vec![0f32; l.scratch_len(1)];
        let mut y = vec![0f32; 16 * 32];
        l.run_io(
            &pool,
            1,
            QIn::F32(&x),
            None,
            QOut::F32(&mut y),
            &mut scratch,
        );
        assert_eq!(y, want);
    }

    #[test]
    fn rejects_grouped_and_bad_scales() {
        let w = vec![0.5f32; 8 * 4 * 9];
        assert!(
            QConv2dNhwc::new(geo(8, 5, 5, 8, 3, 1, 1, 2), &w, None, Activation::None, 0.1).is_err()
        );
        let w1 = vec![0.5f32; 8 * 8];
        for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(
                QConv2dNhwc::new(geo(8, 5, 5, 8, 1, 1, 0, 1), &w1, None, Activation::None, s)
                    .is_err()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn random_layers_match_reference(
            c_in in 1usize..40, c_out in 1usize..50, hw in 1usize..12, k in prop::sample::select(vec![1usize, 3]),
            stride in 1usize..3, dw in any::<bool>(), seed in 0u64..1000,
        ) {
            let pad = k / 2;
            let (c_out, groups) = if dw { (c_in, c_in) } else { (c_out, 1) };
            check(geo(c_in, hw, hw + 1, c_out, k, stride, pad, groups), Activation::Relu, seed % 2 == 0, seed);
        }
    }
}
