//! An INT8 expansion (a pointwise layer) and the FP32 depthwise layer that
//! reads it, run as one: the INT8 twin of
//! [`Conv2dNhwc::run_expand_depthwise`]. The expansion's f32 output rows
//! go into a small ring per thread and the depthwise layer reads them from
//! there, so the block's largest tensor never goes to memory. An INT8
//! engine gains most here: its expansion computes four times faster than
//! the FP32 one, and then spent most of its time writing that tensor.
//!
//! The expansion's sums are exact integers and its epilogue works pixel by
//! pixel, so the fused run equals the two layers run apart, bit for bit.

use super::*;
use crate::conv_nhwc::{Conv2dNhwc, DwOut};

impl QConv2dNhwc {
    /// Whether `self` (the expansion) and `dw` (the FP32 depthwise layer
    /// that reads its f32 output) can run as one
    /// ([`QConv2dNhwc::run_expand_depthwise`]); see
    /// [`Conv2dNhwc::geometries_fuse`].
    pub fn fuses_into(&self, dw: &Conv2dNhwc) -> bool {
        self.dw.is_none()
            && dw.is_depthwise()
            && Conv2dNhwc::geometries_fuse(&self.g, dw.geometry())
    }

    /// Scratch floats [`QConv2dNhwc::run_expand_depthwise`] needs on a
    /// pool of `threads`.
    pub fn fused_scratch_len(&self, dw: &Conv2dNhwc, threads: usize) -> usize {
        self.shared_floats() + dw.band_scratch_len(threads, self.work_floats())
    }

    /// Floats of a thread's own space for packed rows.
    fn work_floats(&self) -> usize {
        self.slot_bytes().div_ceil(4)
    }

    /// Runs `self` (the expansion) and `dw` as one
    /// ([`QConv2dNhwc::fuses_into`]): `input` is the expansion's input
    /// `[batch, h, w, c_in]` (f32, quantized once per image, or INT8 with
    /// this layer's input scale), `residual` the depthwise layer's (its
    /// output's shape), `output` the depthwise output. Equal, bit for bit,
    /// to [`QConv2dNhwc::run_io`] with an f32 output followed by `dw`'s
    /// [`Conv2dNhwc::run`] (or [`Conv2dNhwc::run_to_i8`]).
    ///
    /// # Panics
    /// If the layers do not fuse, or a buffer is shorter than the
    /// geometry needs.
    #[allow(clippy::too_many_arguments)]
    pub fn run_expand_depthwise(
        &self,
        dw: &Conv2dNhwc,
        pool: &ThreadPool,
        batch: usize,
        input: QIn,
        residual: Option<&[f32]>,
        mut output: DwOut,
        scratch: &mut [f32],
    ) {
        assert!(
            self.fuses_into(dw),
            "run_expand_depthwise: the layers do not fuse"
        );
        let g = &self.g;
        let (cin, cout) = (g.c_in, g.c_out);
        let in_img = g.h * g.w * cin;
        let in_len = match input {
            QIn::F32(x) => x.len(),
            QIn::I8(x) => x.len(),
        };
        assert!(in_len >= batch * in_img);
        assert!(scratch.len() >= self.fused_scratch_len(dw, pool.threads()));
        let (shared, scratch) = scratch.split_at_mut(self.shared_floats());
        // SAFETY: the shared floats viewed as bytes (4 per float).
        let shared = unsafe {
            std::slice::from_raw_parts_mut(shared.as_mut_ptr() as *mut i8, shared.len() * 4)
        };
        #[cfg(target_arch = "x86_64")]
        let clamp = crate::gemm::in_register_clamp(self.act);
        let pix = self.pix();
        for b in 0..batch {
            let x = match input {
                QIn::I8(x) => QIn::I8(&x[b * in_img..(b + 1) * in_img]),
                QIn::F32(x) => QIn::F32(&x[b * in_img..(b + 1) * in_img]),
            };
            let x = self.image_i8(pool, x, &mut *shared);
            let expand = |p0: usize, p1: usize, out: &mut [f32], work: &mut [f32]| {
                // Pixels p0..p1 as an image of their own: a pointwise
                // layer's pixels are its rows.
                let xs = &x[p0 * cin..p1 * cin];
                // SAFETY: the work floats viewed as bytes (4 per float).
                let packed = unsafe {
                    std::slice::from_raw_parts_mut(work.as_mut_ptr() as *mut u8, work.len() * 4)
                };
                assert!(out.len() >= (p1 - p0) * cout);
                let y = Dst::F32(SyncPtr::new(out));
                let mut i = 0;
                while i < p1 - p0 {
                    let n = pix.min(p1 - p0 - i);
                    #[cfg(target_arch = "x86_64")]
                    if self.amx {
                        let rows = gemm::amx::Rows::Direct {
                            x: xs,
                            spare: packed,
                        };
                        // SAFETY: `amx` is set only where
                        // `isa::has_amx_int8` holds; `packed` holds PIX_AMX
                        // padded rows (the slot's size); the epilogue
                        // writes pixels i..i+n of `out`, which this thread
                        // alone touches.
                        unsafe {
                            gemm::amx::chunk(self, rows, i, n, 0..self.cblocks, None, y, clamp)
                        };
                        i += n;
                        continue;
                    }
                    self.pack(xs, i, n, packed);
                    self.gemm_chunk(packed, i, n, 0..self.cblocks, None, y);
                    i += n;
                }
            };
            dw.run_depthwise_bands(
                pool,
                b,
                residual,
                output.reborrow(),
                scratch,
                self.work_floats(),
                &expand,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::data;

    /// One group for a 1×1 kernel, else depthwise.
    fn geo(c_in: usize, c_out: usize, hw: (usize, usize), k: usize, s: usize) -> Conv2dGeometry {
        let groups = if k == 1 { 1 } else { c_in };
        crate::conv_nhwc::fused::tests::geo(c_in, c_out, hw, k, s, groups)
    }

    /// The fused run against the INT8 expansion (f32 output) and the FP32
    /// depthwise layer run one after the other, bit for bit: f32 and INT8
    /// input, f32 and INT8 output, with and without the depthwise
    /// residual, 1 to 3 threads, two images, both INT8 tile forms.
    fn check(c_in: usize, c: usize, hw: (usize, usize), k: usize, s: usize, act: Activation) {
        let x_scale = 0.02;
        let e0 = QConv2dNhwc::new(
            geo(c_in, c, hw, 1, 1),
            &data(c * c_in, 1),
            Some(&data(c, 2)),
            act,
            x_scale,
        )
        .unwrap();
        let d = Conv2dNhwc::new(
            geo(c, c, hw, k, s),
            &data(c * k * k, 3),
            Some(&data(c, 4)),
            Activation::Clip { lo: 0.0, hi: 6.0 },
        )
        .unwrap();
        let batch = 2;
        let xf: Vec<f32> = data(batch * hw.0 * hw.1 * c_in, 5)
            .iter()
            .map(|v| v * 2.0)
            .collect();
        let x8: Vec<i8> = xf
            .iter()
            .map(|v| (v / x_scale).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let (oh, ow) = d.out_hw();
        let n_out = batch * oh * ow * c;
        let res = data(n_out, 6);
        let amx = e0.clone().with_amx(true);
        for e in [&e0].into_iter().chain(amx.amx().then_some(&amx)) {
            assert!(e.fuses_into(&d));
            for threads in 1..=3 {
                let pool = ThreadPool::new(threads);
                let mut s_apart = vec![0.0; e.scratch_len(threads).max(d.scratch_len_i8(threads))];
                let mut scratch = vec![f32::NAN; e.fused_scratch_len(&d, threads)];
                for input in [QIn::F32(&xf), QIn::I8(&x8)] {
                    let mut mid = vec![0.0; batch * hw.0 * hw.1 * c];
                    e.run_io(&pool, batch, input, None, QOut::F32(&mut mid), &mut s_apart);
                    for r in [None, Some(&res[..])] {
                        let what = format!(
                            "{c_in}->{c} at {hw:?}, {k}x{k} s{s}, {threads} threads, amx {}, i8 in {}, residual {}",
                            e.amx(),
                            matches!(input, QIn::I8(_)),
                            r.is_some()
                        );
                        let mut want = vec![0.0; n_out];
                        d.run(&pool, batch, &mid, r, &mut want);
                        let mut got = vec![f32::NAN; n_out];
                        e.run_expand_depthwise(
                            &d,
                            &pool,
                            batch,
                            input,
                            r,
                            DwOut::F32(&mut got),
                            &mut scratch,
                        );
                        let same = want
                            .iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "f32 out: {what}");
                        let scale = 0.05;
                        let mut want8 = vec![0i8; n_out];
                        d.run_to_i8(&pool, batch, &mid, r, &mut want8, scale, &mut s_apart);
                        let mut got8 = vec![99i8; n_out];
                        e.run_expand_depthwise(
                            &d,
                            &pool,
                            batch,
                            input,
                            r,
                            DwOut::I8(&mut got8, scale),
                            &mut scratch,
                        );
                        assert_eq!(want8, got8, "i8 out: {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn fused_int8_expansion_matches_the_two_layers() {
        // Channel counts off the 16-lane blocks and the 4-byte groups,
        // several rows per group and a partial last group, strides 1 and
        // 2, 3×3 and 5×5, odd widths.
        check(16, 64, (20, 33), 3, 2, Activation::Relu);
        check(24, 72, (17, 30), 3, 1, Activation::HardSwish);
        check(6, 40, (13, 13), 5, 1, Activation::None);
        check(32, 20, (9, 14), 5, 2, Activation::Clip { lo: 0.0, hi: 6.0 });
        check(5, 18, (3, 7), 3, 1, Activation::Relu);
    }

    #[test]
    fn only_a_pointwise_expansion_and_a_depthwise_reader_fuse() {
        let q = |g: Conv2dGeometry| {
            let n = g.c_out * g.c_in / g.groups * g.kh * g.kw;
            QConv2dNhwc::new(g, &data(n, 1), None, Activation::None, 0.1).unwrap()
        };
        let f = |g: Conv2dGeometry| {
            let n = g.c_out * g.c_in / g.groups * g.kh * g.kw;
            Conv2dNhwc::new(g, &data(n, 2), None, Activation::None).unwrap()
        };
        let d = f(geo(16, 16, (8, 8), 3, 1));
        assert!(q(geo(8, 16, (8, 8), 1, 1)).fuses_into(&d));
        assert!(
            !q(Conv2dGeometry {
                groups: 1,
                ..geo(8, 16, (8, 8), 3, 1)
            })
            .fuses_into(&d),
            "a 3x3 expansion"
        );
        assert!(
            !q(geo(16, 16, (8, 8), 3, 1)).fuses_into(&d),
            "an INT8 depthwise expansion"
        );
        assert!(!q(geo(8, 16, (9, 8), 1, 1)).fuses_into(&d), "sizes differ");
        assert!(
            !q(geo(8, 16, (8, 8), 1, 1)).fuses_into(&f(geo(16, 16, (8, 8), 1, 1))),
            "a gemm reader"
        );
    }
}
