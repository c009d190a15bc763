//! 2-D convolution (NCHW, f32) and transposed convolution.
//!
//! Three algorithms, chosen from the shape when the layer is prepared:
//! * **pointwise** (1×1, stride 1, no padding): the input plane *is* the B
//!   matrix of a GEMM — no copy at all;
//! * **depthwise** (one input channel per group, multiplier 1): a direct kernel
//!   that accumulates each tap over a contiguous output row;
//! * **im2col**: everything else, one GEMM per group whose B operand is the
//!   input unfolded on the fly, panel by panel, while it is packed.
//!
//! Bias and activation are applied in the same pass that produces the output.
//! Transposed convolution lives in [`crate::conv_transpose`] and is
//! re-exported here.

use crate::activation::Activation;
use crate::depthwise::{depthwise_plane, PlaneGeometry};
use crate::error::KernelError;
use crate::gemm::{self, BSource, Blocking, Epilogue, Im2colRef, MatRef, PackedA};
use crate::isa;
use crate::pool::{SyncPtr, ThreadPool};

pub use crate::conv_transpose::{
    reference_conv_transpose2d, ConvTranspose2d, ConvTranspose2dGeometry,
};

/// Geometry of one convolution (per image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (y, x).
    pub stride: [usize; 2],
    /// Dilations (y, x).
    pub dilation: [usize; 2],
    /// Padding: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Groups.
    pub groups: usize,
}

impl Conv2dGeometry {
    /// One channel plane of a depthwise layer with output `oh`×`ow`.
    pub fn plane(&self, oh: usize, ow: usize) -> PlaneGeometry {
        PlaneGeometry {
            h: self.h,
            w: self.w,
            oh,
            ow,
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            dilation: self.dilation,
            pads: self.pads,
        }
    }

    /// One input channel per group, multiplier 1 (a depthwise layer).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.c_in && self.c_out == self.c_in
    }

    /// Output height, or `None` if the kernel does not fit.
    pub fn out_h(&self) -> Option<usize> {
        out_extent(
            self.h,
            self.kh,
            self.stride[0],
            self.dilation[0],
            self.pads[0] + self.pads[2],
        )
    }
    /// Output width, or `None` if the kernel does not fit.
    pub fn out_w(&self) -> Option<usize> {
        out_extent(
            self.w,
            self.kw,
            self.stride[1],
            self.dilation[1],
            self.pads[1] + self.pads[3],
        )
    }

    /// Checks the weights' length (`[c_out, c_in/groups, kh, kw]`) and the
    /// bias's; returns the bias, zeros when there is none. `names` label
    /// the two buffers in errors.
    pub(crate) fn checked_bias(
        &self,
        names: [&'static str; 2],
        weights: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>, KernelError> {
        let need = self.c_out * (self.c_in / self.groups.max(1)) * self.kh * self.kw;
        if weights.len() != need {
            return Err(KernelError::BufferTooSmall {
                kernel: names[0],
                need,
                have: weights.len(),
            });
        }
        match bias {
            Some(b) if b.len() != self.c_out => Err(KernelError::BufferTooSmall {
                kernel: names[1],
                need: self.c_out,
                have: b.len(),
            }),
            Some(b) => Ok(b.to_vec()),
            None => Ok(vec![0.0; self.c_out]),
        }
    }

    pub(crate) fn validate(&self, kernel: &'static str) -> Result<(usize, usize), KernelError> {
        let bad = |detail: String| KernelError::Unsupported { kernel, detail };
        if self.groups == 0
            || !self.c_in.is_multiple_of(self.groups)
            || !self.c_out.is_multiple_of(self.groups)
        {
            return Err(bad(format!(
                "groups {} must divide c_in {} and c_out {}",
                self.groups, self.c_in, self.c_out
            )));
        }
        if self.stride.contains(&0) || self.dilation.contains(&0) || self.kh == 0 || self.kw == 0 {
            return Err(bad("zero stride, dilation or kernel size".into()));
        }
        match (self.out_h(), self.out_w()) {
            (Some(oh), Some(ow)) if oh > 0 && ow > 0 => Ok((oh, ow)),
            _ => Err(bad(format!(
                "kernel {}x{} does not fit input {}x{} with pads {:?}",
                self.kh, self.kw, self.h, self.w, self.pads
            ))),
        }
    }
}

fn out_extent(input: usize, k: usize, stride: usize, dil: usize, pad: usize) -> Option<usize> {
    let span = dil.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
    let padded = input.checked_add(pad)?;
    if padded < span || stride == 0 {
        return Some(0);
    }
    Some((padded - span) / stride + 1)
}

#[derive(Clone, Debug)]
enum Algo {
    Pointwise,
    Depthwise { weights: Vec<f32> },
    Im2col,
    Winograd(crate::winograd::WinogradWeights),
}

/// Convolution algorithms (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvAlgorithm {
    /// 1×1, stride 1, no padding: the input is the GEMM's B.
    Pointwise,
    /// Direct depthwise kernel.
    Depthwise,
    /// GEMM over an implicit im2col view (always applicable).
    Im2col,
    /// Winograd F(2×2, 3×3) (3×3, stride 1, undilated, one group).
    Winograd,
}

/// One implementation choice for a convolution: algorithm plus GEMM blocking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvTactic {
    /// Algorithm.
    pub algorithm: ConvAlgorithm,
    /// GEMM blocking (ignored by the depthwise kernel).
    pub blocking: Blocking,
}

impl ConvTactic {
    /// A stable name, e.g. `pointwise-gemm/nc256`, as stored in engines and
    /// timing caches.
    pub fn name(&self) -> String {
        let direct = if self.blocking.pack_b { "" } else { "/direct" };
        match self.algorithm {
            ConvAlgorithm::Pointwise => format!("pointwise-gemm/nc{}{direct}", self.blocking.nc),
            ConvAlgorithm::Im2col => format!("im2col-gemm/nc{}", self.blocking.nc),
            ConvAlgorithm::Winograd => format!("winograd-f2x3/nc{}", self.blocking.nc),
            ConvAlgorithm::Depthwise => "depthwise-direct".to_string(),
        }
    }

    /// Parses [`ConvTactic::name`].
    pub fn parse(s: &str) -> Option<ConvTactic> {
        if s == "depthwise-direct" {
            return Some(ConvTactic {
                algorithm: ConvAlgorithm::Depthwise,
                blocking: Blocking::DEFAULT,
            });
        }
        let (alg, rest) = s.split_once("/nc")?;
        let (nc, pack_b) = match rest.strip_suffix("/direct") {
            Some(nc) => (nc, false),
            None => (rest, true),
        };
        let nc: usize = nc.parse().ok()?;
        let blocking = Blocking { nc, pack_b };
        if !Blocking::CANDIDATES.contains(&blocking) {
            return None;
        }
        let algorithm = match alg {
            "pointwise-gemm" => ConvAlgorithm::Pointwise,
            "im2col-gemm" if pack_b => ConvAlgorithm::Im2col,
            "winograd-f2x3" if pack_b => ConvAlgorithm::Winograd,
            _ => return None,
        };
        Some(ConvTactic {
            algorithm,
            blocking,
        })
    }

    /// Whether this tactic can run a convolution of geometry `g`.
    pub fn supports(&self, g: &Conv2dGeometry) -> bool {
        match self.algorithm {
            ConvAlgorithm::Pointwise => {
                g.kh == 1
                    && g.kw == 1
                    && g.stride == [1, 1]
                    && g.pads == [0, 0, 0, 0]
                    && g.groups == 1
            }
            ConvAlgorithm::Depthwise => g.is_depthwise(),
            ConvAlgorithm::Im2col => true,
            ConvAlgorithm::Winograd => {
                g.kh == 3
                    && g.kw == 3
                    && g.stride == [1, 1]
                    && g.dilation == [1, 1]
                    && g.groups == 1
            }
        }
    }

    /// The tactic used when nothing was tuned.
    pub fn default_for(g: &Conv2dGeometry) -> ConvTactic {
        let algorithm = if ConvTactic::depthwise().supports(g) {
            ConvAlgorithm::Depthwise
        } else if (ConvTactic {
            algorithm: ConvAlgorithm::Pointwise,
            blocking: Blocking::DEFAULT,
        })
        .supports(g)
        {
            ConvAlgorithm::Pointwise
        } else {
            ConvAlgorithm::Im2col
        };
        ConvTactic {
            algorithm,
            blocking: Blocking::DEFAULT,
        }
    }

    /// Every tactic that supports `g`, for a tuner to time.
    pub fn candidates(g: &Conv2dGeometry) -> Vec<ConvTactic> {
        let mut out = Vec::new();
        if ConvTactic::depthwise().supports(g) {
            // The im2col form of a depthwise layer is a GEMM with one row
            // per group: never competitive, so not offered.
            out.push(ConvTactic::depthwise());
            return out;
        }
        for algorithm in [
            ConvAlgorithm::Pointwise,
            ConvAlgorithm::Im2col,
            ConvAlgorithm::Winograd,
        ] {
            for blocking in Blocking::CANDIDATES {
                // An implicit im2col B is always packed, and Winograd's
                // transformed input is only offered packed.
                if algorithm != ConvAlgorithm::Pointwise && !blocking.pack_b {
                    continue;
                }
                let t = ConvTactic {
                    algorithm,
                    blocking,
                };
                if t.supports(g) {
                    out.push(t);
                }
            }
        }
        out
    }

    fn depthwise() -> ConvTactic {
        ConvTactic {
            algorithm: ConvAlgorithm::Depthwise,
            blocking: Blocking::DEFAULT,
        }
    }
}

/// A prepared convolution: weights packed for the chosen algorithm.
#[derive(Clone, Debug)]
pub struct Conv2d {
    g: Conv2dGeometry,
    oh: usize,
    ow: usize,
    algo: Algo,
    packed: Vec<PackedA>,
    bias: Vec<f32>,
    act: Activation,
    tactic: ConvTactic,
}

impl Conv2d {
    /// Prepares a convolution with the default tactic. `weights` is
    /// `[c_out, c_in/groups, kh, kw]`.
    pub fn new(
        g: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
    ) -> Result<Conv2d, KernelError> {
        Conv2d::with_tactic(g, weights, bias, act, ConvTactic::default_for(&g))
    }

    /// Prepares a convolution with the given tactic (which must support `g`).
    pub fn with_tactic(
        g: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
        tactic: ConvTactic,
    ) -> Result<Conv2d, KernelError> {
        if !tactic.supports(&g) {
            return Err(KernelError::Unsupported {
                kernel: "conv2d",
                detail: format!("tactic {} does not support {g:?}", tactic.name()),
            });
        }
        let (oh, ow) = g.validate("conv2d")?;
        let cin_g = g.c_in / g.groups;
        let cout_g = g.c_out / g.groups;
        let kk = cin_g * g.kh * g.kw;
        let bias = g.checked_bias(["conv2d weights", "conv2d bias"], weights, bias)?;
        let algo = match tactic.algorithm {
            ConvAlgorithm::Depthwise => Algo::Depthwise {
                weights: weights.to_vec(),
            },
            ConvAlgorithm::Pointwise => Algo::Pointwise,
            ConvAlgorithm::Im2col => Algo::Im2col,
            ConvAlgorithm::Winograd => Algo::Winograd(crate::winograd::WinogradWeights::new(
                weights, g.c_out, g.c_in,
            )),
        };
        let packed = match algo {
            Algo::Depthwise { .. } | Algo::Winograd(_) => Vec::new(),
            _ => (0..g.groups)
                .map(|gi| PackedA::pack(cout_g, kk, &weights[gi * cout_g * kk..], kk, 1))
                .collect(),
        };
        Ok(Conv2d {
            g,
            oh,
            ow,
            algo,
            packed,
            bias,
            act,
            tactic,
        })
    }

    /// The tactic in use.
    pub fn tactic(&self) -> ConvTactic {
        self.tactic
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
            Algo::Pointwise => "pointwise-gemm",
            Algo::Depthwise { .. } => "depthwise-direct",
            Algo::Im2col => "im2col-gemm",
            Algo::Winograd(_) => "winograd-f2x3",
        }
    }

    /// Scratch elements [`Conv2d::run`] needs on a pool of `threads`.
    pub fn scratch_len(&self, threads: usize) -> usize {
        match self.algo {
            Algo::Depthwise { .. } => threads.max(1) * self.plane().scratch_len(),
            Algo::Pointwise => gemm::scratch_len(threads),
            Algo::Im2col => gemm::scratch_len(threads),
            Algo::Winograd(_) => {
                crate::winograd::scratch_len(self.g.c_in, self.g.c_out, self.oh, self.ow, threads)
            }
        }
    }

    /// Runs `batch` images: `input` is `[batch, c_in, h, w]`, `output`
    /// `[batch, c_out, oh, ow]`.
    ///
    /// # Panics
    /// If a buffer is shorter than the geometry needs (checked by the engine
    /// when it plans memory).
    pub fn run(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[f32],
        output: &mut [f32],
        scratch: &mut [f32],
    ) {
        self.run_with_residual(pool, batch, input, None, output, scratch)
    }

    /// As [`Conv2d::run`], computing `act(conv(x) + residual)`: the fused
    /// form of `Conv → Add(·, residual) → act`. `residual` has the output's shape.
    pub fn run_with_residual(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[f32],
        residual: Option<&[f32]>,
        output: &mut [f32],
        scratch: &mut [f32],
    ) {
        let g = &self.g;
        let in_img = g.c_in * g.h * g.w;
        let out_img = g.c_out * self.oh * self.ow;
        assert!(input.len() >= batch * in_img && output.len() >= batch * out_img);
        assert!(residual.is_none_or(|r| r.len() >= batch * out_img));
        assert!(scratch.len() >= self.scratch_len(pool.threads()));
        for b in 0..batch {
            let x = &input[b * in_img..(b + 1) * in_img];
            let y = &mut output[b * out_img..(b + 1) * out_img];
            let res = residual.map(|r| &r[b * out_img..(b + 1) * out_img]);
            match &self.algo {
                Algo::Pointwise => {
                    let hw = g.h * g.w;
                    let bm = MatRef {
                        data: x,
                        rs: hw,
                        cs: 1,
                    };
                    let epi = Epilogue {
                        bias: Some(&self.bias),
                        act: self.act,
                        accumulate: false,
                        residual: res,
                    };
                    gemm::sgemm_blocked(
                        pool,
                        &self.packed[0],
                        bm,
                        hw,
                        y,
                        hw,
                        epi,
                        scratch,
                        self.tactic.blocking,
                    );
                }
                Algo::Depthwise { weights } => self.depthwise(pool, weights, x, res, y, scratch),
                Algo::Im2col => self.im2col_gemm(pool, x, res, y, scratch),
                Algo::Winograd(w) => {
                    let shape = crate::winograd::Shape {
                        h: g.h,
                        w: g.w,
                        oh: self.oh,
                        ow: self.ow,
                        pad_tl: [g.pads[0], g.pads[1]],
                    };
                    crate::winograd::run(
                        pool,
                        w,
                        shape,
                        x,
                        &self.bias,
                        res,
                        self.act,
                        y,
                        scratch,
                        self.tactic.blocking,
                    )
                }
            }
        }
    }

    fn im2col_gemm(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut [f32],
    ) {
        let g = &self.g;
        let cin_g = g.c_in / g.groups;
        let cout_g = g.c_out / g.groups;
        let ohw = self.oh * self.ow;
        for gi in 0..g.groups {
            let xg = &x[gi * cin_g * g.h * g.w..(gi + 1) * cin_g * g.h * g.w];
            // The input is unfolded panel by panel while B is packed, so no
            // K×N im2col matrix is ever materialised.
            let view = Im2colRef {
                data: xg,
                h: g.h,
                w: g.w,
                kernel: [g.kh, g.kw],
                stride: g.stride,
                dilation: g.dilation,
                pad_tl: [g.pads[0], g.pads[1]],
                ow: self.ow,
            };
            let epi = Epilogue {
                bias: Some(&self.bias[gi * cout_g..(gi + 1) * cout_g]),
                act: self.act,
                accumulate: false,
                residual: res.map(|r| &r[gi * cout_g * ohw..(gi + 1) * cout_g * ohw]),
            };
            let yg = &mut y[gi * cout_g * ohw..(gi + 1) * cout_g * ohw];
            gemm::sgemm_blocked(
                pool,
                &self.packed[gi],
                BSource::Im2col(view),
                ohw,
                yg,
                ohw,
                epi,
                scratch,
                self.tactic.blocking,
            );
        }
    }

    fn plane(&self) -> PlaneGeometry {
        self.g.plane(self.oh, self.ow)
    }

    fn depthwise(
        &self,
        pool: &ThreadPool,
        weights: &[f32],
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut [f32],
    ) {
        let g = self.g;
        let plane = self.plane();
        let (oh, ow) = (self.oh, self.ow);
        let per_slot = plane.scratch_len();
        let isa = isa::active();
        let y_ptr = SyncPtr::new(y);
        let s_ptr = SyncPtr::new(scratch);
        let task = |c: usize, slot: usize| {
            let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
            let wc = &weights[c * g.kh * g.kw..(c + 1) * g.kh * g.kw];
            // SAFETY: each task writes only channel c's output plane, and each
            // thread slot owns a disjoint window of scratch (sized in
            // `scratch_len` for the pool's thread count).
            let (yc, buf) = unsafe {
                (
                    std::slice::from_raw_parts_mut(y_ptr.add(c * oh * ow), oh * ow),
                    std::slice::from_raw_parts_mut(s_ptr.add(slot * per_slot), per_slot),
                )
            };
            match res {
                None => depthwise_plane(isa, &plane, xc, wc, self.bias[c], self.act, yc, buf),
                Some(r) => {
                    depthwise_plane(isa, &plane, xc, wc, self.bias[c], Activation::None, yc, buf);
                    let rc = &r[c * oh * ow..(c + 1) * oh * ow];
                    yc.iter_mut()
                        .zip(rc)
                        .for_each(|(v, rv)| *v = self.act.apply(*v + rv));
                }
            }
        };
        pool.run(g.c_in, &task);
    }
}

/// Scalar reference convolution (f64 accumulation), `[c_in,h,w]` → `[c_out,oh,ow]`.
pub fn reference_conv2d(
    g: &Conv2dGeometry,
    x: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    let oh = g.out_h().unwrap_or(0);
    let ow = g.out_w().unwrap_or(0);
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    for co in 0..g.c_out {
        let gi = co / cout_g;
        for oy in 0..oh {
            for ox in 0..ow {
                let mut s = bias.map_or(0.0, |b| b[co] as f64);
                for ci in 0..cin_g {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                - g.pads[0] as isize;
                            let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                - g.pads[1] as isize;
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            let xv = x[((gi * cin_g + ci) * g.h + iy as usize) * g.w + ix as usize];
                            let wv = weights[((co * cin_g + ci) * g.kh + ky) * g.kw + kx];
                            s += xv as f64 * wv as f64;
                        }
                    }
                }
                y[(co * oh + oy) * ow + ox] = act.apply(s as f32);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test values in [-1, 1] (an LCG; seeds give unrelated streams).
    pub(crate) fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn check_conv(g: Conv2dGeometry, threads: usize, batch: usize) {
        for t in ConvTactic::candidates(&g) {
            assert_eq!(ConvTactic::parse(&t.name()), Some(t));
            check_conv_tactic(g, threads, batch, t);
        }
    }

    fn check_conv_tactic(g: Conv2dGeometry, threads: usize, batch: usize, tactic: ConvTactic) {
        let cin_g = g.c_in / g.groups;
        let x = data(batch * g.c_in * g.h * g.w, 1);
        let w = data(g.c_out * cin_g * g.kh * g.kw, 2);
        let b = data(g.c_out, 3);
        let act = Activation::Clip { lo: -2.0, hi: 2.0 };
        let conv = Conv2d::with_tactic(g, &w, Some(&b), act, tactic).unwrap();
        let (oh, ow) = conv.out_hw();
        let out_img = g.c_out * oh * ow;
        let pool = ThreadPool::new(threads);
        let mut y = vec![f32::NAN; batch * out_img];
        let mut scratch = vec![0.0; conv.scratch_len(threads)];
        conv.run(&pool, batch, &x, &mut y, &mut scratch);
        let mut want = vec![0.0; out_img];
        for bi in 0..batch {
            reference_conv2d(
                &g,
                &x[bi * g.c_in * g.h * g.w..],
                &w,
                Some(&b),
                act,
                &mut want,
            );
            for (i, (a, e)) in y[bi * out_img..(bi + 1) * out_img]
                .iter()
                .zip(&want)
                .enumerate()
            {
                let tol = 1e-4 * ((cin_g * g.kh * g.kw) as f32).sqrt() * (1.0 + e.abs());
                assert!(
                    (a - e).abs() <= tol,
                    "{:?} [{bi}][{i}] {a} vs {e} ({})",
                    g,
                    conv.algorithm()
                );
            }
        }
        // Fused residual: act(conv(x) + r).
        let r = data(batch * out_img, 4);
        conv.run_with_residual(&pool, batch, &x, Some(&r), &mut y, &mut scratch);
        for bi in 0..batch {
            reference_conv2d(
                &g,
                &x[bi * g.c_in * g.h * g.w..],
                &w,
                Some(&b),
                Activation::None,
                &mut want,
            );
            for (i, (a, e)) in y[bi * out_img..(bi + 1) * out_img]
                .iter()
                .zip(&want)
                .enumerate()
            {
                let e = act.apply(e + r[bi * out_img + i]);
                let tol = 1e-4 * ((cin_g * g.kh * g.kw) as f32).sqrt() * (1.0 + e.abs());
                assert!(
                    (a - e).abs() <= tol,
                    "residual {:?} [{bi}][{i}] {a} vs {e} ({})",
                    g,
                    conv.algorithm()
                );
            }
        }
    }

    fn geom(
        c_in: usize,
        c_out: usize,
        hw: (usize, usize),
        k: (usize, usize),
        s: (usize, usize),
        d: (usize, usize),
        pads: [usize; 4],
        groups: usize,
    ) -> Conv2dGeometry {
        Conv2dGeometry {
            c_in,
            h: hw.0,
            w: hw.1,
            c_out,
            kh: k.0,
            kw: k.1,
            stride: [s.0, s.1],
            dilation: [d.0, d.1],
            pads,
            groups,
        }
    }

    #[test]
    fn model_like_layers() {
        // EfficientNet-style TF-SAME asymmetric pads, depthwise 5x5 stride 2.
        check_conv(
            geom(8, 8, (15, 15), (5, 5), (2, 2), (1, 1), [1, 1, 2, 2], 8),
            2,
            1,
        );
        check_conv(
            geom(3, 16, (17, 17), (3, 3), (2, 2), (1, 1), [0, 0, 1, 1], 1),
            2,
            2,
        );
        check_conv(
            geom(16, 24, (9, 9), (1, 1), (1, 1), (1, 1), [0, 0, 0, 0], 1),
            3,
            1,
        );
        check_conv(
            geom(6, 4, (7, 11), (3, 3), (2, 1), (2, 2), [2, 2, 2, 2], 2),
            1,
            1,
        );
    }

    #[test]
    fn winograd_matches_reference_on_odd_sizes_and_pads() {
        for (hw, pads) in [
            ((9, 11), [1, 1, 1, 1]),
            ((7, 6), [0, 1, 1, 0]),
            ((4, 3), [2, 2, 2, 2]),
            ((3, 3), [0; 4]),
        ] {
            let g = geom(5, 7, hw, (3, 3), (1, 1), (1, 1), pads, 1);
            let t = ConvTactic::parse("winograd-f2x3/nc256").unwrap();
            assert!(ConvTactic::candidates(&g).contains(&t));
            check_conv_tactic(g, 2, 2, t);
        }
    }

    #[test]
    fn rejects_bad_geometry() {
        let g = geom(3, 4, (2, 2), (5, 5), (1, 1), (1, 1), [0, 0, 0, 0], 1);
        assert!(Conv2d::new(g, &[0.0; 4 * 3 * 25], None, Activation::None).is_err());
        let g = geom(3, 4, (8, 8), (3, 3), (1, 1), (1, 1), [0, 0, 0, 0], 2);
        assert!(Conv2d::new(g, &[0.0; 36], None, Activation::None).is_err());
        let g = geom(3, 4, (8, 8), (3, 3), (1, 1), (1, 1), [0, 0, 0, 0], 1);
        assert!(Conv2d::new(g, &[0.0; 3], None, Activation::None).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn conv_matches_reference(
            cpg in 1usize..5, opg in 1usize..5, groups in 1usize..4, dw: bool,
            h in 1usize..12, w in 1usize..12, kh in 1usize..4, kw in 1usize..4,
            sy in 1usize..3, sx in 1usize..3, dy in 1usize..3, dx in 1usize..3,
            pt in 0usize..3, pl in 0usize..3, pb in 0usize..3, pr in 0usize..3,
            threads in 1usize..4, batch in 1usize..3,
        ) {
            let (c_in, c_out, groups) = if dw { (groups * cpg, groups * cpg, groups * cpg) }
                                        else { (cpg * groups, opg * groups, groups) };
            let g = geom(c_in, c_out, (h, w), (kh, kw), (sy, sx), (dy, dx), [pt, pl, pb, pr], groups);
            prop_assume!(g.out_h().unwrap_or(0) > 0 && g.out_w().unwrap_or(0) > 0);
            check_conv(g, threads, batch);
        }

    }
}
