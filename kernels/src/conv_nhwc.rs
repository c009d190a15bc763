//! 2-D convolution in the channels-last layout (NHWC, f32).
//!
//! The engine's layout pass (`osprey_engine::passes::channels_last`) may run a model's
//! convolutions channels-last, with the layout conversions at the graph's
//! boundary. In NHWC every pixel's channels are contiguous, which gives two
//! kernels without any copy of the input:
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
use crate::isa::{self, Isa};
use crate::pool::{SyncPtr, ThreadPool};

/// Pixels per micro-tile (AVX2 and portable: 6 pixels × 16 channels in
/// 12 of the 16 ymm registers).
const MR: usize = 6;
/// Pixels per micro-tile with AVX-512: 12 pixels × 32 channels (two
/// panels) in 24 of the 32 zmm registers.
const MR512: usize = 12;
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
    /// it again.
    ///
    /// # Panics
    /// If the layer is not depthwise ([`Conv2dNhwc::writes_i8`]) or a
    /// buffer is shorter than the geometry needs.
    #[allow(clippy::too_many_arguments)]
    pub fn run_to_i8(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[f32],
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
                self.depthwise_row(isa, x, w, oy, rr, RowOut::I8 { buf, y, inv });
            });
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

    #[allow(clippy::too_many_arguments)]
    /// The gemm algorithm with tiles of `M` pixels × `P` panels.
    fn run_gemm<const M: usize, const P: usize>(
        &self,
        pool: &ThreadPool,
        isa: Isa,
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        panels: &[f32],
        k: usize,
    ) {
        let g = &self.g;
        let (cin, cout) = (g.c_in, g.c_out);
        let taps = g.kh * g.kw;
        let pixels = self.oh * self.ow;
        let n_panels = cout.div_ceil(NR);
        // Pixel blocks whose A rows (about k floats each) stay in L1/L2
        // while every panel of the block's columns passes over them.
        let pb = ((12 * 1024 / k.max(1)) / M * M).clamp(4 * M, 128 * M);
        // Blocks of even size, never a small remainder block: each block
        // streams all the weights once (a 7×7 map would otherwise be a
        // block of 48 pixels and one of a single pixel, reading megabytes
        // of weights twice).
        // The blocks share the tiles evenly (196 pixels in four blocks:
        // 4, 4, 4 and 5 tiles of 12, not 5, 5, 5 and 2).
        let n_pb = ((pixels + pb / 2) / pb).max(1);
        let all_tiles = pixels.div_ceil(M);
        let n_pb = n_pb.min(all_tiles);
        let block = |bi: usize| ((bi * all_tiles / n_pb) * M).min(pixels);
        let threads = pool.threads();
        let want = if threads > 1 { threads * 3 } else { 1 };
        let panel_chunks = if n_pb >= want {
            1
        } else {
            want.div_ceil(n_pb).min(n_panels)
        };
        // A chunk holds whole tiles' worth (P) of panels. On a small map
        // (split by panels) where the rounding leaves a task count the
        // threads do not divide (1152->320 at 7²: five chunks, three tasks
        // for one thread and two for the other), smaller chunks that they
        // do divide, if any.
        let groups = n_panels.div_ceil(P);
        let mut per_group = groups.div_ceil(panel_chunks);
        let tasks = |g: usize| n_pb * groups.div_ceil(g);
        if panel_chunks > 1 && tasks(per_group) % threads != 0 {
            if let Some(g) = (1..per_group).rev().find(|&g| tasks(g) % threads == 0) {
                per_group = g;
            }
        }
        let per_chunk = per_group * P;
        let panel_chunks = n_panels.div_ceil(per_chunk);
        let clamp = crate::gemm::in_register_clamp(self.act);
        let pointwise = taps == 1 && g.stride == [1, 1] && g.pads == [0; 4];
        let write_ahead = pointwise && pixels * cout >= 128 * 1024;
        let y_ptr = SyncPtr::new(y);
        let task = |t: usize, _slot: usize| {
            let zeros = self.zeros.as_ptr();
            let (bi, ci) = (t / panel_chunks, t % panel_chunks);
            let (p0, p1) = (block(bi), block(bi + 1));
            let q0 = ci * per_chunk;
            let q1 = (q0 + per_chunk).min(n_panels);
            let mut rows = [[zeros; M]; MAX_TAPS];
            // Points `rows` at the A rows of pixels p..p+n_rows; returns the
            // taps the tile reads, and the distance in floats between
            // consecutive rows when every tap's rows are that far apart
            // inside the input and the tile is full (0 otherwise).
            let setup = |p: usize, n_rows: usize, rows: &mut [[*const f32; M]; MAX_TAPS]| {
                if pointwise {
                    for (r, slot) in rows[0].iter_mut().enumerate() {
                        *slot = if r < n_rows {
                            x[(p + r) * cin..(p + r + 1) * cin].as_ptr()
                        } else {
                            zeros
                        };
                    }
                    return (1, 0);
                }
                let (mut oy, mut ox) = (p / self.ow, p % self.ow);
                // A tile inside one output row whose windows are all inside
                // the input's width: every tap's pixels are one pointer
                // apart by `stride · cin` floats (most tiles).
                let (sx, last) = (g.stride[1], ox + n_rows - 1);
                if last < self.ow && self.interior_col(ox) && self.interior_col(last) {
                    let step = sx * cin;
                    let mut uniform = n_rows == M;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let t = ky * g.kw + kx;
                            match self.tap_pixel(oy, ox, ky, kx) {
                                Some(px) => {
                                    // In bounds: the last pixel's tap is
                                    // `px + (n_rows - 1)·stride`, inside the
                                    // row by the test above.
                                    // One bounds check per tap; the rows
                                    // are `step` floats apart inside it.
                                    let base =
                                        x[px * cin..(px + (n_rows - 1) * sx + 1) * cin].as_ptr();
                                    for (r, slot) in rows[t].iter_mut().enumerate() {
                                        *slot = if r < n_rows {
                                            base.wrapping_add(r * step)
                                        } else {
                                            zeros
                                        };
                                    }
                                }
                                None => {
                                    uniform = false;
                                    rows[t].iter_mut().for_each(|slot| *slot = zeros)
                                }
                            }
                        }
                    }
                    return (taps, if uniform { step } else { 0 });
                }
                // Tiles that wrap to the next output row or touch the
                // padding: pixel by pixel.
                for r in 0..M {
                    if r >= n_rows {
                        rows[..taps].iter_mut().for_each(|t| t[r] = zeros);
                        continue;
                    }
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            rows[ky * g.kw + kx][r] = match self.tap_pixel(oy, ox, ky, kx) {
                                Some(px) => x[px * cin..(px + 1) * cin].as_ptr(),
                                None => zeros,
                            };
                        }
                    }
                    ox += 1;
                    if ox == self.ow {
                        (oy, ox) = (oy + 1, 0);
                    }
                }
                (taps, 0)
            };
            let compute = |q: usize,
                           p: usize,
                           n_rows: usize,
                           (rows, step): (&[[*const f32; M]], usize),
                           prefetch: Prefetch| {
                let c0 = q * NR;
                let cols = (cout - c0).min(P * NR);
                let out = Tile {
                    rows,
                    cin,
                    w: &panels[q * k * NR..(q + P).min(n_panels) * k * NR],
                    panel_len: k * NR,
                    bias: &self.bias[c0..c0 + P * NR],
                    res: res.map(|r| &r[p * cout + c0..]),
                    ldc: cout,
                    n_rows,
                    cols,
                    clamp,
                    prefetch,
                    step,
                };
                // SAFETY: this task alone writes pixels p..p+n_rows of
                // channels c0..c0+cols (disjoint (pixel block × panel
                // chunk) regions per task); the assert in `run` bounds
                // them inside `y`.
                let dst = unsafe { y_ptr.add(p * cout + c0) };
                out.compute(isa, dst);
            };
            // Small weights (all of this task's panels fit in L1/L2): set a
            // tile's rows up once and sweep the panels; otherwise keep one
            // panel hot and sweep the tiles.
            if (q1 - q0) * k * NR * 4 <= 64 * 1024 {
                for p in (p0..p1).step_by(M) {
                    let n_rows = (p1 - p).min(M);
                    let (nt, step) = setup(p, n_rows, &mut rows);
                    // A pointwise tile's A rows are one run of the input:
                    // the first panel group's tile pulls the next tile's
                    // into L1 (the hardware prefetcher keeps up with one
                    // stream, not the twelve rows a tile reads from).
                    let next = if pointwise {
                        let from = ((p + M) * cin).min(x.len());
                        Prefetch::L1(&x[from..((p + 2 * M) * cin).min(x.len())])
                    } else {
                        Prefetch::None
                    };
                    // A store-bound layer (few input channels, an output
                    // bigger than the caches) also claims the next tile's
                    // output lines for writing.
                    if write_ahead {
                        let (c0, c1) = (q0 * NR, (q1 * NR).min(cout));
                        for pp in p + M..(p + 2 * M).min(p1) {
                            // SAFETY: pixel pp < p1 ≤ pixels: inside `y`.
                            let row = unsafe { y_ptr.add(pp * cout + c0) };
                            isa::prefetch_write(row.cast(), (c1 - c0) * 4);
                        }
                    }
                    for q in (q0..q1).step_by(P) {
                        let pf = if q == q0 { next } else { Prefetch::None };
                        compute(q, p, n_rows, (&rows[..nt], step), pf);
                    }
                }
            } else {
                // Large weights come from memory once per task: while the
                // tiles sweep one group of panels (from L2 after the first
                // tile), they prefetch the next group into L2, each tile an
                // equal share, so no tile waits on memory. After the last
                // group comes the next task's first (the pool runs a
                // thread's tasks in order).
                let n_tiles = (p1 - p0).div_ceil(M);
                let next_task_q = ((t + 1) % panel_chunks) * per_chunk;
                for q in (q0..q1).step_by(P) {
                    let nq = if q + P < q1 { q + P } else { next_task_q };
                    let nq_end = if q + P < q1 { q1 } else { n_panels };
                    let next = &panels[nq * k * NR..(nq + P).min(nq_end) * k * NR];
                    let share = next.len().div_ceil(n_tiles).next_multiple_of(16);
                    for (i, p) in (p0..p1).step_by(M).enumerate() {
                        let n_rows = (p1 - p).min(M);
                        let (nt, step) = setup(p, n_rows, &mut rows);
                        let from = (i * share).min(next.len());
                        let to = (from + share).min(next.len());
                        let pf = Prefetch::L2(&next[from..to]);
                        compute(q, p, n_rows, (&rows[..nt], step), pf);
                    }
                }
            }
            // An activation the tiles could not apply in registers goes
            // over the task's block once it is written (still in cache):
            // one slice when the task has every channel.
            if clamp.is_none() {
                let (c0, c1) = (q0 * NR, (q1 * NR).min(cout));
                if c1 - c0 == cout {
                    // SAFETY: pixels p0..p1, every channel, are this task's
                    // (see `compute`).
                    let block = unsafe {
                        std::slice::from_raw_parts_mut(y_ptr.add(p0 * cout), (p1 - p0) * cout)
                    };
                    self.act.apply_slice(block);
                } else {
                    for p in p0..p1 {
                        // SAFETY: channels c0..c1 of pixel p are this
                        // task's (see `compute`).
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(y_ptr.add(p * cout + c0), c1 - c0)
                        };
                        self.act.apply_slice(row);
                    }
                }
            }
        };
        pool.run(n_pb * panel_chunks, &task);
    }

    fn run_depthwise(
        &self,
        pool: &ThreadPool,
        isa: Isa,
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        w: &[f32],
    ) {
        let c = self.g.c_out;
        let row_len = self.ow * c;
        let y_ptr = SyncPtr::new(y);
        let task = |oy: usize, _slot: usize| {
            // SAFETY: task `oy` alone writes output row `oy`, inside `y` by
            // the assert in `run`.
            let yr = unsafe { std::slice::from_raw_parts_mut(y_ptr.add(oy * row_len), row_len) };
            let rr = res.map(|r| &r[oy * row_len..(oy + 1) * row_len]);
            self.depthwise_row(isa, x, w, oy, rr, RowOut::F32(yr));
        };
        pool.run(self.oh, &task);
    }

    /// One output row of a depthwise layer.
    fn depthwise_row(
        &self,
        isa: Isa,
        x: &[f32],
        w: &[f32],
        oy: usize,
        res: Option<&[f32]>,
        mut sink: RowOut,
    ) {
        let g = &self.g;
        let c = g.c_out;
        let clamp = crate::gemm::in_register_clamp(self.act);
        let mut taps = [(0usize, 0usize); MAX_TAPS];
        let taps_of = |ox: usize, taps: &mut [(usize, usize); MAX_TAPS]| {
            let mut n = 0;
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    if let Some(px) = self.tap_pixel(oy, ox, ky, kx) {
                        taps[n] = (px * c, (ky * g.kw + kx) * c);
                        n += 1;
                    }
                }
            }
            n
        };
        // A pixel is interior when every column of its window is inside
        // the input; the taps of interior pixels of one row differ only by
        // a shift, so they are computed once and moved along.
        let sx = g.stride[1];
        let mut n = 0;
        let mut at: Option<usize> = None;
        let mut ox = 0;
        while ox < self.ow {
            match at {
                Some(prev) if self.interior_col(ox) => {
                    let shift = (ox - prev) * sx * c;
                    taps[..n].iter_mut().for_each(|t| t.0 += shift);
                    at = Some(ox);
                }
                _ => {
                    n = taps_of(ox, &mut taps);
                    at = self.interior_col(ox).then_some(ox);
                }
            }
            // Interior neighbours share the weight loads: two with AVX2,
            // up to four with AVX-512; they are `stride · c` floats apart.
            let most = if isa.has_avx512() { DW_GROUP } else { 2 };
            let mut px = 1;
            while at.is_some() && px < most && ox + px < self.ow && self.interior_col(ox + px) {
                px += 1;
            }
            // An INT8 row with an activation applied in registers: the
            // AVX-512 kernel requantizes before its store (`quantized`).
            #[cfg(target_arch = "x86_64")]
            let out_i8 = match &mut sink {
                RowOut::I8 { y, inv, .. } if clamp.is_some() && isa.has_avx512() => {
                    Some((y[ox * c..(ox + px) * c].as_mut_ptr(), *inv))
                }
                _ => None,
            };
            #[cfg(not(target_arch = "x86_64"))]
            let out_i8: Option<(*mut i8, f32)> = None;
            let quantized = out_i8.is_some();
            let out = match &mut sink {
                RowOut::F32(y) => &mut y[ox * c..(ox + px) * c],
                RowOut::I8 { buf, .. } => &mut buf[..px * c],
            };
            let r = res.map(|r| &r[ox * c..(ox + px) * c]);
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the AVX2 tiers are active only when the CPU has
                // AVX2 and FMA (AVX-512 on its tier); every tap offset (plus,
                // for the later pixels of a group, `p · stride · c`: they are
                // interior) addresses `c` floats inside `x`, the weights
                // hold `c` floats per tap, and `out`/`r` hold `px · c`
                // floats.
                Isa::Avx2Fma | Isa::Avx512 => unsafe {
                    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
                    let dw = DwSimd {
                        x: x.as_ptr(),
                        w: w.as_ptr(),
                        taps: &taps[..n],
                        pstep: g.stride[1] * c,
                        bias: self.bias.as_ptr(),
                        res: r.map(|r| r.as_ptr()),
                        out: out.as_mut_ptr(),
                        out_i8,
                        c,
                        lo,
                        hi,
                    };
                    // Four interior pixels of a stride-1 layer: taps come
                    // in whole rows of `kw` columns (a sliding window).
                    let rows = px == 4 && g.stride[1] == 1 && g.dilation[1] == 1 && n % g.kw == 0;
                    match (isa.has_avx512(), px, if rows { g.kw } else { 0 }) {
                        (true, 4, 3) => dw.run_avx512::<4, 3>(),
                        (true, 4, 5) => dw.run_avx512::<4, 5>(),
                        (true, 4, _) => dw.run_avx512::<4, 0>(),
                        (true, 3, _) => dw.run_avx512::<3, 0>(),
                        (true, 2, _) => dw.run_avx512::<2, 0>(),
                        (true, _, _) => dw.run_avx512::<1, 0>(),
                        (false, 2, _) => dw.run::<2>(),
                        (false, _, _) => dw.run::<1>(),
                    }
                },
                _ => {
                    for p in 0..px {
                        depthwise_pixel_body::<{ cfg!(target_arch = "aarch64") }>(
                            &x[p * sx * c..],
                            w,
                            &taps[..n],
                            &self.bias[..c],
                            r.map(|r| &r[p * c..(p + 1) * c]),
                            &mut out[p * c..(p + 1) * c],
                        );
                        if let Some((lo, hi)) = clamp {
                            let o = &mut out[p * c..(p + 1) * c];
                            o.iter_mut().for_each(|v| *v = v.max(lo).min(hi));
                        }
                    }
                }
            }
            if clamp.is_none() {
                self.act.apply_slice(out);
            }
            if let (RowOut::I8 { buf, y, inv }, false) = (&mut sink, quantized) {
                let q = &mut y[ox * c..(ox + px) * c];
                crate::int8::quantize_to_i8(isa, &buf[..px * c], *inv, q);
            }
            ox += px;
        }
    }
}

/// Most neighbouring pixels one depthwise step computes (AVX-512; two with
/// AVX2, one otherwise).
const DW_GROUP: usize = 4;

/// Where [`Conv2dNhwc::depthwise_row`] puts an output row.
enum RowOut<'a> {
    /// The f32 row.
    F32(&'a mut [f32]),
    /// Each pixel group computed into `buf` (at least [`DW_GROUP`] pixels)
    /// and requantized into the INT8 row `y` with `inv` (1 / scale).
    I8 {
        buf: &'a mut [f32],
        y: &'a mut [i8],
        inv: f32,
    },
}

/// The AVX2 / AVX-512 depthwise kernels' operands for a group of
/// neighbouring pixels (up to two with AVX2, four with AVX-512).
#[cfg(target_arch = "x86_64")]
struct DwSimd<'a> {
    x: *const f32,
    w: *const f32,
    /// (input offset of pixel 0, weight offset) per valid tap.
    taps: &'a [(usize, usize)],
    /// Input offset of pixel `p + 1` relative to pixel `p`.
    pstep: usize,
    bias: *const f32,
    /// Residual of pixel 0 (each next pixel's `c` floats later).
    res: Option<*const f32>,
    /// Output of pixel 0 (each next pixel's `c` floats later).
    out: *mut f32,
    /// Instead of `out` (AVX-512 only): the INT8 output of pixel 0 and
    /// 1 / its scale; each result is requantized in registers as
    /// [`crate::int8::quantize_to_i8`] would requantize the stored float.
    out_i8: Option<(*mut i8, f32)>,
    c: usize,
    lo: f32,
    hi: f32,
}

#[cfg(target_arch = "x86_64")]
impl DwSimd<'_> {
    /// `P` pixels: 32 channels at a time in registers (taps inner), then
    /// 8 at a time, then a masked tail.
    ///
    /// # Safety
    /// AVX2 and FMA available; the pointers as the caller documents.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const P: usize>(&self) {
        let mut c0 = 0;
        // SAFETY: forwarded; every block stays below `c`.
        unsafe {
            while c0 + 32 <= self.c {
                self.block::<4, P>(c0, None);
                c0 += 32;
            }
            while c0 + 8 <= self.c {
                self.block::<1, P>(c0, None);
                c0 += 8;
            }
            if c0 < self.c {
                self.block::<1, P>(c0, Some(self.c - c0));
            }
        }
    }

    /// `V` vectors of channels from `c0` (the last one `tail` lanes wide
    /// when given) for `P` pixels.
    ///
    /// # Safety
    /// As [`DwSimd::run`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const V: usize, const P: usize>(&self, c0: usize, tail: Option<usize>) {
        use std::arch::x86_64::*;
        // SAFETY: full vectors lie below `c` in every buffer; a tail vector
        // is masked to its `tail` lanes, so no masked-out lane is touched.
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail.unwrap_or(8) as i32), lanes);
            let ld = |p: *const f32| {
                if tail.is_some() {
                    _mm256_maskload_ps(p, mask)
                } else {
                    _mm256_loadu_ps(p)
                }
            };
            let mut acc = [[_mm256_setzero_ps(); V]; P];
            for row in acc.iter_mut() {
                for (v, a) in row.iter_mut().enumerate() {
                    *a = ld(self.bias.add(c0 + 8 * v));
                }
            }
            for &(xo, wo) in self.taps {
                let xp = self.x.add(xo + c0);
                let wp = self.w.add(wo + c0);
                for v in 0..V {
                    let wv = ld(wp.add(8 * v));
                    for (p, row) in acc.iter_mut().enumerate() {
                        row[v] = _mm256_fmadd_ps(ld(xp.add(p * self.pstep + 8 * v)), wv, row[v]);
                    }
                }
            }
            let (vlo, vhi) = (_mm256_set1_ps(self.lo), _mm256_set1_ps(self.hi));
            for (p, row) in acc.iter().enumerate() {
                for (v, &a) in row.iter().enumerate() {
                    let off = p * self.c + c0 + 8 * v;
                    let mut r = a;
                    if let Some(res) = self.res {
                        r = _mm256_add_ps(r, ld(res.add(off)));
                    }
                    r = _mm256_min_ps(_mm256_max_ps(r, vlo), vhi);
                    if tail.is_some() {
                        _mm256_maskstore_ps(self.out.add(off), mask, r);
                    } else {
                        _mm256_storeu_ps(self.out.add(off), r);
                    }
                }
            }
        }
    }

    /// [`DwSimd::run`] in zmm registers: 64 channels at a time, then 16,
    /// then a masked tail.
    ///
    /// # Safety
    /// AVX-512 F available; the pointers as the caller documents.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512<const P: usize, const KW: usize>(&self) {
        let mut c0 = 0;
        // SAFETY: forwarded; every block stays below `c`.
        unsafe {
            while c0 + 64 <= self.c {
                self.block512::<4, P, KW>(c0, 16);
                c0 += 64;
            }
            while c0 + 16 <= self.c {
                self.block512::<1, P, KW>(c0, 16);
                c0 += 16;
            }
            if c0 < self.c {
                self.block512::<1, P, KW>(c0, self.c - c0);
            }
        }
    }

    /// `V` zmm vectors of channels from `c0`, the last `last` lanes wide,
    /// for `P` pixels. `KW > 0` (stride 1, no dilation, `P + KW ≤ 9`):
    /// the taps are rows of `KW` neighbouring columns, and each row's
    /// `P + KW − 1` input columns are loaded once and shared by the
    /// pixels (a sliding window) instead of once per pixel and tap.
    ///
    /// # Safety
    /// As [`DwSimd::run_avx512`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn block512<const V: usize, const P: usize, const KW: usize>(
        &self,
        c0: usize,
        last: usize,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: full vectors lie below `c` in every buffer; the last
        // vector is masked to its `last` lanes, so no masked-out lane is
        // touched.
        unsafe {
            let full: __mmask16 = 0xffff;
            let tail = ((1u32 << last) - 1) as __mmask16;
            let m = |v: usize| if v + 1 == V { tail } else { full };
            let mut acc = [[_mm512_setzero_ps(); V]; P];
            for row in acc.iter_mut() {
                for (v, a) in row.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(m(v), self.bias.add(c0 + 16 * v));
                }
            }
            if KW > 0 {
                // Row `ky`'s taps: input columns `kx` of pixel `p` are
                // column `p + kx` of the row (`c` floats apart), weights
                // `c` apart too.
                for row in self.taps.chunks_exact(KW) {
                    let (xo, wo) = row[0];
                    let xp = self.x.add(xo + c0);
                    let wp = self.w.add(wo + c0);
                    for v in 0..V {
                        let mut cols = [_mm512_setzero_ps(); 8];
                        for (j, col) in cols.iter_mut().enumerate().take(P + KW - 1) {
                            *col = _mm512_maskz_loadu_ps(m(v), xp.add(j * self.c + 16 * v));
                        }
                        for kx in 0..KW {
                            let wv = _mm512_maskz_loadu_ps(m(v), wp.add(kx * self.c + 16 * v));
                            for (p, acc_p) in acc.iter_mut().enumerate() {
                                acc_p[v] = _mm512_fmadd_ps(cols[p + kx], wv, acc_p[v]);
                            }
                        }
                    }
                }
            } else {
                for &(xo, wo) in self.taps {
                    let xp = self.x.add(xo + c0);
                    let wp = self.w.add(wo + c0);
                    for v in 0..V {
                        let wv = _mm512_maskz_loadu_ps(m(v), wp.add(16 * v));
                        for (p, row) in acc.iter_mut().enumerate() {
                            let xv = _mm512_maskz_loadu_ps(m(v), xp.add(p * self.pstep + 16 * v));
                            row[v] = _mm512_fmadd_ps(xv, wv, row[v]);
                        }
                    }
                }
            }
            let (vlo, vhi) = (_mm512_set1_ps(self.lo), _mm512_set1_ps(self.hi));
            let qmax = crate::qconv::QMAX;
            let (qlo, qhi) = (_mm512_set1_ps(-qmax), _mm512_set1_ps(qmax));
            for (p, row) in acc.iter().enumerate() {
                for (v, &a) in row.iter().enumerate() {
                    let off = p * self.c + c0 + 16 * v;
                    let mut r = a;
                    if let Some(res) = self.res {
                        r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m(v), res.add(off)));
                    }
                    r = _mm512_min_ps(_mm512_max_ps(r, vlo), vhi);
                    match self.out_i8 {
                        // The stored float's requantization, step for step:
                        // times 1/scale, clamped to ±127, rounded to
                        // nearest even (the conversion's default mode;
                        // in range, so the saturating narrow never
                        // saturates).
                        Some((q, inv)) => {
                            let t = _mm512_mul_ps(r, _mm512_set1_ps(inv));
                            let t = _mm512_min_ps(_mm512_max_ps(t, qlo), qhi);
                            let i = _mm512_cvtps_epi32(t);
                            _mm512_mask_cvtsepi32_storeu_epi8(q.add(off), m(v), i);
                        }
                        None => _mm512_mask_storeu_ps(self.out.add(off), m(v), r),
                    }
                }
            }
        }
    }
}

/// `out = bias + Σ_taps x[xo..] · w[wo..] (+ res)`, across the channels.
#[inline(always)]
fn depthwise_pixel_body<const FMA: bool>(
    x: &[f32],
    w: &[f32],
    taps: &[(usize, usize)],
    bias: &[f32],
    res: Option<&[f32]>,
    out: &mut [f32],
) {
    let c = out.len();
    out.copy_from_slice(bias);
    for &(xo, wo) in taps {
        let (xs, ws) = (&x[xo..xo + c], &w[wo..wo + c]);
        for ((o, &a), &b) in out.iter_mut().zip(xs).zip(ws) {
            *o = if FMA { a.mul_add(b, *o) } else { *o + a * b };
        }
    }
    if let Some(r) = res {
        out.iter_mut().zip(r).for_each(|(o, &v)| *o += v);
    }
}

/// Data a [`Tile`] prefetches while it computes, and into which cache.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Prefetch<'a> {
    None,
    /// The next tile's A rows (needed within microseconds).
    L1(&'a [f32]),
    /// The next panels' weights (needed by the next sweep of tiles).
    L2(&'a [f32]),
}

/// One micro-tile of the gemm algorithm: up to `M` pixels × one or two
/// panels of [`NR`] output channels.
struct Tile<'a, const M: usize> {
    /// Per tap, per pixel: the `cin` A values (input or zeros).
    rows: &'a [[*const f32; M]],
    cin: usize,
    /// One or two consecutive panels: `(tap·cin + ci)·NR + j` within each.
    w: &'a [f32],
    /// Floats per panel (`taps·cin·NR`).
    panel_len: usize,
    /// The panels' biases (NR per panel).
    bias: &'a [f32],
    /// Residual at the tile's first element, row stride `ldc`.
    res: Option<&'a [f32]>,
    ldc: usize,
    n_rows: usize,
    /// Valid output channels, at most NR per panel in `w`.
    cols: usize,
    /// Applied before the store (Relu, Clip, none); `None`: the caller
    /// applies the activation afterwards.
    clamp: Option<(f32, f32)>,
    /// What the tile prefetches while it computes: one 64-byte line per
    /// step of the reduction, as far as the reduction reaches. (The
    /// AVX-512 tile only: the others ignore it.)
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    prefetch: Prefetch<'a>,
    /// Non-zero: every tap's `M` rows lie `step` floats apart from its
    /// first (`rows[t][r] == rows[t][0] + r·step`, all inside the input).
    /// The AVX-512 tile then addresses a 3-channel input (a network's
    /// stem) from one pointer per tap.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    step: usize,
}

impl<const M: usize> Tile<'_, M> {
    /// Writes the tile at `dst` (row stride `ldc`).
    fn compute(&self, isa: Isa, dst: *mut f32) {
        let panels = self.w.len() / self.panel_len.max(1);
        assert!(self.panel_len == self.rows.len() * self.cin * NR);
        assert!((1..=2).contains(&panels) && self.w.len() == panels * self.panel_len);
        assert!(self.cols <= panels * NR && self.n_rows <= M && self.bias.len() >= panels * NR);
        if let Some(r) = self.res {
            assert!(r.len() >= (self.n_rows - 1) * self.ldc + self.cols);
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX-512 tier is active only when the CPU has
            // AVX-512 F/BW/DQ/VL (and AVX2, FMA); every row pointer holds
            // `cin` readable floats (input or the zero row), the panel
            // lengths were checked above, and `dst` is the caller's region
            // of n_rows × cols.
            Isa::Avx512 => unsafe {
                // A stem's full tiles (3 input channels, rows a fixed
                // distance apart: stride 1 or 2).
                match (self.cin, self.step, panels) {
                    (3, 3, 1) => return self.avx512_stem::<1, 3>(dst),
                    (3, 6, 1) => return self.avx512_stem::<1, 6>(dst),
                    (3, 3, 2) => return self.avx512_stem::<2, 3>(dst),
                    (3, 6, 2) => return self.avx512_stem::<2, 6>(dst),
                    _ => {}
                }
                // Short tiles (the end of a pixel block) compute only the
                // rows they have, in steps of four.
                match (panels, self.n_rows.div_ceil(4)) {
                    (2, 1) => self.avx512::<2, 4>(dst),
                    (2, 2) => self.avx512::<2, 8>(dst),
                    (2, _) => self.avx512::<2, M>(dst),
                    (_, 1) => self.avx512::<1, 4>(dst),
                    (_, 2) => self.avx512::<1, 8>(dst),
                    _ => self.avx512::<1, M>(dst),
                }
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX2 tier is active only when the CPU has AVX2
            // and FMA; otherwise as above (the AVX2 form takes one panel).
            Isa::Avx2Fma if panels == 1 => unsafe { self.avx2(dst) },
            // SAFETY: as above.
            _ => unsafe { self.portable(dst) },
        }
    }

    /// # Safety
    /// As [`Tile::compute`]'s call.
    unsafe fn portable(&self, dst: *mut f32) {
        let mut acc = [[[0.0f32; NR]; 2]; M];
        for (h, panel) in self.w.chunks_exact(self.panel_len).enumerate() {
            let mut wi = 0;
            for taps in self.rows {
                for ci in 0..self.cin {
                    let wr = &panel[wi..wi + NR];
                    wi += NR;
                    for (r, row) in acc.iter_mut().enumerate() {
                        // SAFETY: each row pointer holds `cin` floats.
                        let a = unsafe { *taps[r].add(ci) };
                        for (o, &b) in row[h].iter_mut().zip(wr) {
                            *o += a * b;
                        }
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(self.n_rows) {
            for j in 0..self.cols {
                let mut v = row[j / NR][j % NR] + self.bias[j];
                if let Some(res) = self.res {
                    v += res[r * self.ldc + j];
                }
                if let Some((lo, hi)) = self.clamp {
                    v = v.max(lo).min(hi);
                }
                // SAFETY: inside the caller's n_rows × cols region.
                unsafe { *dst.add(r * self.ldc + j) = v };
            }
        }
    }

    /// One panel, `M` ≤ [`MR`] rows in ymm registers.
    ///
    /// # Safety
    /// AVX2 and FMA available; otherwise as [`Tile::compute`]'s call.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self, dst: *mut f32) {
        use std::arch::x86_64::*;
        // SAFETY: loads stay inside the panel (length checked by the
        // caller) and the row pointers' `cin` floats; stores and residual
        // loads are masked to `cols` columns of `n_rows` rows.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            let mut wp = self.w.as_ptr();
            for taps in self.rows {
                let a = *taps;
                for ci in 0..self.cin {
                    let b0 = _mm256_loadu_ps(wp);
                    let b1 = _mm256_loadu_ps(wp.add(8));
                    wp = wp.add(NR);
                    for r in 0..M {
                        let av = _mm256_broadcast_ss(&*a[r].add(ci));
                        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
                    }
                }
            }
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
            let masks = [mask(self.cols.min(8)), mask(self.cols.saturating_sub(8))];
            let bias = [
                _mm256_loadu_ps(self.bias.as_ptr()),
                _mm256_loadu_ps(self.bias.as_ptr().add(8)),
            ];
            let (lo, hi) = self.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
            let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
            for (r, row) in acc.iter().enumerate().take(self.n_rows) {
                for h in 0..2 {
                    if h * 8 >= self.cols {
                        break;
                    }
                    let mut v = _mm256_add_ps(row[h], bias[h]);
                    if let Some(res) = self.res {
                        let rp = res.as_ptr().add(r * self.ldc + h * 8);
                        v = _mm256_add_ps(v, _mm256_maskload_ps(rp, masks[h]));
                    }
                    v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
                    let d = dst.add(r * self.ldc + h * 8);
                    if self.cols >= (h + 1) * 8 {
                        _mm256_storeu_ps(d, v);
                    } else {
                        _mm256_maskstore_ps(d, masks[h], v);
                    }
                }
            }
        }
    }

    /// `P` panels (one zmm register of 16 channels each) × the first `R`
    /// rows (`n_rows ≤ R ≤ M`).
    ///
    /// # Safety
    /// AVX-512 F available, `w` holds `P` panels; otherwise as
    /// [`Tile::compute`]'s call.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512<const P: usize, const R: usize>(&self, dst: *mut f32) {
        assert!(self.n_rows <= R && R <= M);
        use std::arch::x86_64::*;
        // SAFETY: loads stay inside the P panels (lengths checked by the
        // caller) and the row pointers' `cin` floats; stores and residual
        // loads are masked to `cols` columns of `n_rows` rows.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); P]; R];
            let mut wp = self.w.as_ptr();
            // Prefetch pointer and its end (lines of 16 floats).
            let (to_l1, region) = match self.prefetch {
                Prefetch::None => (false, &[][..]),
                Prefetch::L1(r) => (true, r),
                Prefetch::L2(r) => (false, r),
            };
            let mut pf = region.as_ptr();
            let pf_end = pf.add(region.len());
            for taps in self.rows {
                let a = *taps;
                for ci in 0..self.cin {
                    if pf < pf_end {
                        if to_l1 {
                            _mm_prefetch::<_MM_HINT_T0>(pf.cast());
                        } else {
                            _mm_prefetch::<_MM_HINT_T1>(pf.cast());
                        }
                        pf = pf.add(16);
                    }
                    let mut b = [_mm512_setzero_ps(); P];
                    for (h, bh) in b.iter_mut().enumerate() {
                        *bh = _mm512_loadu_ps(wp.add(h * self.panel_len));
                    }
                    wp = wp.add(NR);
                    for r in 0..R {
                        let av = _mm512_set1_ps(*a[r].add(ci));
                        for h in 0..P {
                            acc[r][h] = _mm512_fmadd_ps(av, b[h], acc[r][h]);
                        }
                    }
                }
            }
            self.store512::<P, R>(&acc, dst);
        }
    }

    /// [`Tile::avx512`] for a full tile of a 3-channel input whose rows
    /// are `STEP` floats apart in every tap ([`Tile::step`]): each
    /// broadcast reads at a constant offset from the tap's one pointer,
    /// where the general tile loads a row pointer for each.
    ///
    /// # Safety
    /// As [`Tile::avx512`], with `cin == 3`, `n_rows == M` and
    /// `step == STEP`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512_stem<const P: usize, const STEP: usize>(&self, dst: *mut f32) {
        assert!(self.cin == 3 && self.n_rows == M && self.step == STEP);
        use std::arch::x86_64::*;
        // SAFETY: tap t's rows are rows[t][0] + r·STEP for r < M (the
        // setup's guarantee for a non-zero step), each 3 readable floats;
        // weight loads stay inside the P panels; the epilogue as in
        // `avx512`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); P]; M];
            let mut wp = self.w.as_ptr();
            for taps in self.rows {
                let a = taps[0];
                for ci in 0..3 {
                    let mut b = [_mm512_setzero_ps(); P];
                    for (h, bh) in b.iter_mut().enumerate() {
                        *bh = _mm512_loadu_ps(wp.add(h * self.panel_len));
                    }
                    wp = wp.add(NR);
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*a.add(r * STEP + ci));
                        for h in 0..P {
                            acc_r[h] = _mm512_fmadd_ps(av, b[h], acc_r[h]);
                        }
                    }
                }
            }
            self.store512::<P, M>(&acc, dst);
        }
    }

    /// Bias, residual and clamp on the first `n_rows` of `R` rows of
    /// accumulators, then one masked store per row and panel.
    ///
    /// Always inlined, without a target feature of its own (that and
    /// `inline(always)` do not go together): in its AVX-512 callers the
    /// accumulators stay in registers and the intrinsics inline.
    ///
    /// # Safety
    /// As [`Tile::avx512`]; called only from AVX-512 code.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store512<const P: usize, const R: usize>(
        &self,
        acc: &[[std::arch::x86_64::__m512; P]; R],
        dst: *mut f32,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: bias holds P panels (checked by `compute`); residual
        // loads and stores are masked to `cols` columns of `n_rows` rows
        // of the caller's region.
        unsafe {
            let mut masks = [0 as __mmask16; P];
            let mut bias = [_mm512_setzero_ps(); P];
            for h in 0..P {
                let n = self.cols.saturating_sub(h * NR).min(NR);
                masks[h] = ((1u32 << n) - 1) as __mmask16;
                bias[h] = _mm512_loadu_ps(self.bias.as_ptr().add(h * NR));
            }
            let (lo, hi) = self.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
            let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
            // Rows by constant index (unrolled), so the accumulators stay
            // in registers.
            for r in 0..R {
                if r >= self.n_rows {
                    break;
                }
                for h in 0..P {
                    let mut v = _mm512_add_ps(acc[r][h], bias[h]);
                    if let Some(res) = self.res {
                        let rp = res.as_ptr().add(r * self.ldc + h * NR);
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], rp));
                    }
                    v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
                    _mm512_mask_storeu_ps(dst.add(r * self.ldc + h * NR), masks[h], v);
                }
            }
        }
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

    /// A depthwise layer writing INT8 equals its f32 run quantized after
    /// (the INT8 kernels' requantization), bit for bit, on every thread
    /// count; the f32 tensor is never written.
    #[test]
    fn depthwise_to_i8_is_the_f32_run_quantized() {
        for (c, hw, k, s, p) in [
            (24, 13, 3, 1, 1),
            (40, 14, 5, 2, 2),
            (13, 6, 3, 2, 0),
            (100, 6, 3, 1, 1),
        ] {
            for (act, residual) in [
                (Activation::Clip { lo: 0.0, hi: 6.0 }, false),
                (Activation::None, true),
                (Activation::Silu, false),
            ] {
                let g = geo(c, c, hw, k, s, p, c);
                let (oh, ow) = (g.out_h().unwrap(), g.out_w().unwrap());
                let batch = 2;
                let x = data(batch * c * g.h * g.w, 5);
                let w = data(c * k * k, 6);
                let b = data(c, 7);
                let r = data(batch * c * oh * ow, 8);
                let res = residual.then_some(&r[..]);
                let layer = Conv2dNhwc::new(g, &w, Some(&b), act).unwrap();
                assert!(layer.writes_i8() && Conv2dNhwc::writes_i8_for(&g));
                let out_scale = 0.013f32;
                for threads in [1, 3] {
                    let pool = ThreadPool::new(threads);
                    let mut y = vec![0.0; batch * c * oh * ow];
                    layer.run(&pool, batch, &x, res, &mut y);
                    let mut want = vec![0i8; y.len()];
                    crate::int8::quantize_to_i8(isa::active(), &y, 1.0 / out_scale, &mut want);
                    let mut got = vec![0i8; y.len()];
                    let mut scratch = vec![f32::NAN; layer.scratch_len_i8(threads)];
                    layer.run_to_i8(&pool, batch, &x, res, &mut got, out_scale, &mut scratch);
                    assert_eq!(got, want, "{g:?} {act:?} t{threads}");
                    // Saturation happens (the scale is small for these values).
                    assert!(got.iter().any(|&v| v.abs() == 127), "{g:?}");
                }
            }
        }
        let pg = geo(8, 8, 4, 1, 1, 0, 1);
        let pointwise = Conv2dNhwc::new(pg, &data(64, 1), None, Activation::None);
        assert!(!pointwise.unwrap().writes_i8() && !Conv2dNhwc::writes_i8_for(&pg));
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
