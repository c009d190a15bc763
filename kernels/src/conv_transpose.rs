//! Transposed convolution (NCHW, f32): one GEMM per group into columns
//! (`Wᵀ · x`), then col2im scatters the columns into the output.

use crate::activation::Activation;
use crate::error::KernelError;
use crate::gemm::{self, Epilogue, MatRef, PackedA};
use crate::pool::{SyncPtr, ThreadPool};

/// Geometry of a transposed convolution (per image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dGeometry {
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
    /// Padding removed from the full output: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Extra rows/columns added at the bottom/right.
    pub output_padding: [usize; 2],
    /// Groups.
    pub groups: usize,
}

impl ConvTranspose2dGeometry {
    /// Output (height, width), or `None` when padding exceeds the full extent.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let ext = |i: usize, k: usize, s: usize, d: usize, p: usize, op: usize| {
            let full = (i.checked_sub(1)?).checked_mul(s)? + d * (k.checked_sub(1)?) + 1 + op;
            full.checked_sub(p)
        };
        Some((
            ext(
                self.h,
                self.kh,
                self.stride[0],
                self.dilation[0],
                self.pads[0] + self.pads[2],
                self.output_padding[0],
            )?,
            ext(
                self.w,
                self.kw,
                self.stride[1],
                self.dilation[1],
                self.pads[1] + self.pads[3],
                self.output_padding[1],
            )?,
        ))
    }
}

/// A prepared transposed convolution: GEMM into columns, then col2im.
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    g: ConvTranspose2dGeometry,
    oh: usize,
    ow: usize,
    packed: Vec<PackedA>,
    bias: Vec<f32>,
    act: Activation,
}

impl ConvTranspose2d {
    /// Prepares the layer. `weights` is `[c_in, c_out/groups, kh, kw]`.
    pub fn new(
        g: ConvTranspose2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
    ) -> Result<ConvTranspose2d, KernelError> {
        let bad = |detail: String| KernelError::Unsupported {
            kernel: "conv_transpose2d",
            detail,
        };
        if g.groups == 0 || !g.c_in.is_multiple_of(g.groups) || !g.c_out.is_multiple_of(g.groups) {
            return Err(bad("groups must divide both channel counts".into()));
        }
        if g.stride.contains(&0) || g.dilation.contains(&0) || g.kh == 0 || g.kw == 0 {
            return Err(bad("zero stride, dilation or kernel size".into()));
        }
        let (oh, ow) = g
            .out_hw()
            .filter(|&(a, b)| a > 0 && b > 0)
            .ok_or_else(|| bad("padding larger than the output".into()))?;
        let cin_g = g.c_in / g.groups;
        let cout_g = g.c_out / g.groups;
        let rows = cout_g * g.kh * g.kw;
        if weights.len() != g.c_in * rows {
            return Err(KernelError::BufferTooSmall {
                kernel: "conv_transpose2d weights",
                need: g.c_in * rows,
                have: weights.len(),
            });
        }
        let bias = match bias {
            Some(b) if b.len() != g.c_out => {
                return Err(KernelError::BufferTooSmall {
                    kernel: "conv_transpose2d bias",
                    need: g.c_out,
                    have: b.len(),
                })
            }
            Some(b) => b.to_vec(),
            None => vec![0.0; g.c_out],
        };
        // A = W_gᵀ: row (co, ky, kx), column ci.
        let packed = (0..g.groups)
            .map(|gi| PackedA::pack(rows, cin_g, &weights[gi * cin_g * rows..], 1, rows))
            .collect();
        Ok(ConvTranspose2d {
            g,
            oh,
            ow,
            packed,
            bias,
            act,
        })
    }

    /// Output (height, width).
    pub fn out_hw(&self) -> (usize, usize) {
        (self.oh, self.ow)
    }

    /// Scratch elements needed on a pool of `threads`.
    pub fn scratch_len(&self, threads: usize) -> usize {
        let cout_g = self.g.c_out / self.g.groups;
        cout_g * self.g.kh * self.g.kw * self.g.h * self.g.w + gemm::scratch_len(threads)
    }

    /// Runs `batch` images `[batch, c_in, h, w]` → `[batch, c_out, oh, ow]`.
    ///
    /// # Panics
    /// If a buffer is too short (validated when memory is planned).
    pub fn run(
        &self,
        pool: &ThreadPool,
        batch: usize,
        input: &[f32],
        output: &mut [f32],
        scratch: &mut [f32],
    ) {
        let g = &self.g;
        let cin_g = g.c_in / g.groups;
        let cout_g = g.c_out / g.groups;
        let hw = g.h * g.w;
        let (oh, ow) = (self.oh, self.ow);
        let rows = cout_g * g.kh * g.kw;
        let in_img = g.c_in * hw;
        let out_img = g.c_out * oh * ow;
        let (cols, gemm_scratch) = scratch.split_at_mut(rows * hw);
        for b in 0..batch {
            for gi in 0..g.groups {
                let x = &input[b * in_img + gi * cin_g * hw..b * in_img + (gi + 1) * cin_g * hw];
                let bm = MatRef {
                    data: x,
                    rs: hw,
                    cs: 1,
                };
                gemm::sgemm(
                    pool,
                    &self.packed[gi],
                    bm,
                    hw,
                    cols,
                    hw,
                    Epilogue::NONE,
                    gemm_scratch,
                );
                let y = &mut output[b * out_img + gi * cout_g * oh * ow..];
                let y_ptr = SyncPtr::new(y);
                let cols_ref: &[f32] = cols;
                let task = |co: usize, _slot: usize| {
                    // SAFETY: each task owns output channel `co` of this group.
                    let plane =
                        unsafe { std::slice::from_raw_parts_mut(y_ptr.add(co * oh * ow), oh * ow) };
                    plane
                        .iter_mut()
                        .for_each(|v| *v = self.bias[gi * cout_g + co]);
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let src = &cols_ref[((co * g.kh + ky) * g.kw + kx) * hw..][..hw];
                            for iy in 0..g.h {
                                let oy = (iy * g.stride[0] + ky * g.dilation[0]) as isize
                                    - g.pads[0] as isize;
                                if oy < 0 || oy >= oh as isize {
                                    continue;
                                }
                                let orow = &mut plane[oy as usize * ow..(oy as usize + 1) * ow];
                                for ix in 0..g.w {
                                    let ox = (ix * g.stride[1] + kx * g.dilation[1]) as isize
                                        - g.pads[1] as isize;
                                    if ox >= 0 && ox < ow as isize {
                                        orow[ox as usize] += src[iy * g.w + ix];
                                    }
                                }
                            }
                        }
                    }
                    self.act.apply_slice(plane);
                };
                pool.run(cout_g, &task);
            }
        }
    }
}

/// Scalar reference transposed convolution, `[c_in,h,w]` → `[c_out,oh,ow]`.
pub fn reference_conv_transpose2d(
    g: &ConvTranspose2dGeometry,
    x: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let Some((oh, ow)) = g.out_hw() else { return };
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    let mut acc = vec![0.0f64; g.c_out * oh * ow];
    for ci in 0..g.c_in {
        let gi = ci / cin_g;
        for col in 0..cout_g {
            let co = gi * cout_g + col;
            for iy in 0..g.h {
                for ix in 0..g.w {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let oy = (iy * g.stride[0] + ky * g.dilation[0]) as isize
                                - g.pads[0] as isize;
                            let ox = (ix * g.stride[1] + kx * g.dilation[1]) as isize
                                - g.pads[1] as isize;
                            if oy < 0 || ox < 0 || oy >= oh as isize || ox >= ow as isize {
                                continue;
                            }
                            let wv = weights[((ci * cout_g + col) * g.kh + ky) * g.kw + kx];
                            acc[(co * oh + oy as usize) * ow + ox as usize] +=
                                x[(ci * g.h + iy) * g.w + ix] as f64 * wv as f64;
                        }
                    }
                }
            }
        }
    }
    for co in 0..g.c_out {
        for i in 0..oh * ow {
            y[co * oh * ow + i] =
                (acc[co * oh * ow + i] + bias.map_or(0.0, |b| b[co] as f64)) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn conv_transpose_matches_reference(
            cin in 1usize..5, cout in 1usize..5, h in 1usize..7, w in 1usize..7,
            k in 1usize..4, s in 1usize..3, pad in 0usize..2, op in 0usize..2, threads in 1usize..3,
        ) {
            let g = ConvTranspose2dGeometry { c_in: cin, h, w, c_out: cout, kh: k, kw: k,
                stride: [s, s], dilation: [1, 1], pads: [pad, pad, pad, pad],
                output_padding: [op.min(s - 1), op.min(s - 1)], groups: 1 };
            prop_assume!(g.out_hw().is_some_and(|(a, b)| a > 0 && b > 0));
            let x = data(cin * h * w, 5);
            let wt = data(cin * cout * k * k, 6);
            let b = data(cout, 7);
            let layer = ConvTranspose2d::new(g, &wt, Some(&b), Activation::None).unwrap();
            let (oh, ow) = layer.out_hw();
            let pool = ThreadPool::new(threads);
            let mut y = vec![0.0; cout * oh * ow];
            let mut scratch = vec![0.0; layer.scratch_len(threads)];
            layer.run(&pool, 1, &x, &mut y, &mut scratch);
            let mut want = vec![0.0; cout * oh * ow];
            reference_conv_transpose2d(&g, &x, &wt, Some(&b), &mut want);
            for (a, e) in y.iter().zip(&want) {
                prop_assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()) * (cin as f32).sqrt());
            }
        }
    }
}
