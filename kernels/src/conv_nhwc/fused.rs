//! An expansion (a 1×1 gemm layer) and the depthwise layer that reads it,
//! run as one: the expansion's output rows go into a small ring buffer per
//! thread, and each depthwise output row is computed as soon as the rows
//! it reads are there. The expanded tensor — the largest in an inverted
//! residual block, 4.8 MB at 112² × 96 channels — never goes to memory:
//! the ring (a few rows) stays in L2, where the depthwise layer reads it.
//!
//! Rows are computed in groups whose pixels fill whole GEMM tiles
//! ([`group_rows`]); output rows are split into one band per thread, each
//! band computing the rows it reads (the few rows at a band's top are
//! computed by both bands that read them). Every value is computed as the
//! unfused layers compute it — the same tiles' sums in the same order — so
//! the results are the same bit for bit.

use super::depthwise::{Ring, RowOut, DW_GROUP};
use super::gemm::GemmIo;
use super::{Algo, Conv2dNhwc, MR, MR512, MR512_LONG, NR};
use crate::conv::Conv2dGeometry;
use crate::isa::{self, Isa};
use crate::pool::{Dst, SyncPtr, ThreadPool};

/// Where [`Conv2dNhwc::run_expand_depthwise`] writes the depthwise output.
pub enum DwOut<'a> {
    /// f32, `[batch, oh, ow, c]`.
    F32(&'a mut [f32]),
    /// INT8 with this scale (requantized as [`Conv2dNhwc::run_to_i8`]
    /// does).
    I8(&'a mut [i8], f32),
}

impl DwOut<'_> {
    /// The same output, borrowed for a shorter while.
    pub fn reborrow(&mut self) -> DwOut<'_> {
        match self {
            DwOut::F32(y) => DwOut::F32(y),
            DwOut::I8(y, s) => DwOut::I8(y, *s),
        }
    }
}

/// How [`Conv2dNhwc::run_depthwise_bands`] gets its input rows:
/// `expand(p0, p1, out, work)` writes input pixels `p0..p1` (every
/// channel) to `out`, with `work` the thread's own floats.
pub(crate) type ExpandRows<'a> = dyn Fn(usize, usize, &mut [f32], &mut [f32]) + Sync + 'a;

/// Expansion pixels per group of rows: enough for a dozen tiles, so the
/// last, partial tile of a group is a small share.
const GROUP_PIXELS: usize = 144;

/// Floats per cache line.
const ALIGN: usize = 16;

/// Rows per computed group for rows `w` pixels wide.
fn group_rows(w: usize) -> usize {
    GROUP_PIXELS.div_ceil(w.max(1))
}

impl Conv2dNhwc {
    /// Whether `self` (the expansion) and `dw` (the depthwise layer that
    /// reads its output) can run as one
    /// ([`Conv2dNhwc::run_expand_depthwise`]); see
    /// [`Conv2dNhwc::geometries_fuse`].
    pub fn fuses_into(&self, dw: &Conv2dNhwc) -> bool {
        matches!(self.algo, Algo::Gemm { .. })
            && matches!(dw.algo, Algo::Depthwise { .. })
            && Self::geometries_fuse(&self.g, &dw.g)
    }

    /// Whether layers of geometries `e` and `d` fuse: `e` is a 1×1
    /// stride-1 unpadded one-group layer, `d` a depthwise layer (one
    /// channel per group) of `e`'s output channels and size, with a stride
    /// no larger than its window (every input row is read). The planner asks before any
    /// layer is prepared.
    pub fn geometries_fuse(e: &Conv2dGeometry, d: &Conv2dGeometry) -> bool {
        Self::supports(e)
            && Self::supports(d)
            && e.groups == 1
            && d.is_depthwise()
            && d.groups > 1
            && (e.kh, e.kw, e.stride, e.pads) == (1, 1, [1, 1], [0; 4])
            && (d.h, d.w, d.c_in) == (e.h, e.w, e.c_out)
            && d.stride[0] <= (d.kh - 1) * d.dilation[0] + 1
    }

    /// Bytes of the tensor a fused pair keeps out of memory, per image:
    /// the expansion's f32 output.
    pub fn expanded_bytes(e: &Conv2dGeometry) -> usize {
        e.h * e.w * e.c_out * 4
    }

    /// The ring a fused run keeps per thread: groups of rows, and enough
    /// groups that every row one depthwise output row reads is held.
    fn ring_for(dw: &Conv2dNhwc) -> Ring {
        let d = &dw.g;
        let rows = group_rows(d.w).min(d.h.max(1));
        let span = (d.kh - 1) * d.dilation[0] + 1;
        // The rows of one output row, [lo, lo + span), touch at most
        // ceil((span − 1) / rows) + 1 groups.
        Ring {
            rows,
            groups: (span - 1).div_ceil(rows) + 1,
        }
    }

    /// Scratch floats [`Conv2dNhwc::run_expand_depthwise`] needs: a ring
    /// and one group of depthwise output pixels per thread.
    pub fn fused_scratch_len(&self, dw: &Conv2dNhwc, threads: usize) -> usize {
        dw.band_scratch_len(threads, 0)
    }

    /// Scratch floats [`Conv2dNhwc::run_depthwise_bands`] needs on
    /// `threads` threads when each also needs `work` floats of its own.
    pub(crate) fn band_scratch_len(&self, threads: usize, work: usize) -> usize {
        self.slot_len(work) * threads.max(1) + ALIGN
    }

    /// Floats per thread: the ring, one group of depthwise output pixels
    /// and `work` floats for the expansion, rounded up to whole cache
    /// lines.
    fn slot_len(&self, work: usize) -> usize {
        let ring = Self::ring_for(self);
        let c = self.g.c_out;
        (ring.rows * ring.groups * self.g.w * c + DW_GROUP * c).next_multiple_of(ALIGN)
            + work.next_multiple_of(ALIGN)
    }

    /// Runs `self` (the expansion) and `dw` as one
    /// ([`Conv2dNhwc::fuses_into`]): `input` is the expansion's input
    /// `[batch, h, w, c_in]`, `residual` the depthwise layer's (its
    /// output's shape), `output` the depthwise output. Equal, bit for bit,
    /// to [`Conv2dNhwc::run`] of `self` followed by `dw`'s
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
        input: &[f32],
        residual: Option<&[f32]>,
        mut output: DwOut,
        scratch: &mut [f32],
    ) {
        assert!(
            self.fuses_into(dw),
            "run_expand_depthwise: the layers do not fuse"
        );
        let Algo::Gemm { panels, k } = &self.algo else {
            unreachable!("checked by fuses_into");
        };
        let in_img = self.g.h * self.g.w * self.g.c_in;
        assert!(input.len() >= batch * in_img);
        let isa = isa::active();
        for b in 0..batch {
            let x = &input[b * in_img..(b + 1) * in_img];
            let expand = |p0: usize, p1: usize, out: &mut [f32], _: &mut [f32]| {
                let io = GemmIo {
                    isa,
                    x,
                    res: None,
                    y: SyncPtr::new(out),
                    y_first: p0,
                    panels,
                    k: *k,
                    write_ahead: false,
                };
                // SAFETY: `out` holds pixels p0..p1 of every channel
                // (`run_depthwise_bands` hands out whole rows of the
                // ring), which this thread alone touches.
                unsafe { self.expand_span(&io, p0, p1) };
            };
            dw.run_depthwise_bands(pool, b, residual, output.reborrow(), scratch, 0, &expand);
        }
    }

    /// Depthwise `self` on image `b` of `output` (and of `residual`),
    /// reading input rows that `expand` computes as they are needed:
    /// `expand(p0, p1, out, work)` writes input pixels `p0..p1`, every
    /// channel, to `out` (`(p1 − p0) · c` floats), with `work` (`work`
    /// floats) the thread's own. Output rows are split into one band per
    /// thread; each band computes the rows it reads into its own ring.
    ///
    /// # Panics
    /// If a buffer is shorter than the geometry needs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_depthwise_bands(
        &self,
        pool: &ThreadPool,
        b: usize,
        residual: Option<&[f32]>,
        mut output: DwOut,
        scratch: &mut [f32],
        work: usize,
        expand: &ExpandRows,
    ) {
        let Algo::Depthwise { w: dw_w } = &self.algo else {
            panic!("run_depthwise_bands: not a depthwise layer");
        };
        let d = &self.g;
        let c = d.c_out;
        let row_len = self.ow * c;
        let out_img = self.oh * row_len;
        let out_len = match &output {
            DwOut::F32(y) => y.len(),
            DwOut::I8(y, _) => y.len(),
        };
        assert!(out_len >= (b + 1) * out_img);
        assert!(residual.is_none_or(|r| r.len() >= (b + 1) * out_img));
        let threads = pool.threads().max(1);
        assert!(scratch.len() >= self.band_scratch_len(threads, work));
        let isa = isa::active();
        let ring = Self::ring_for(self);
        let ring_len = ring.rows * ring.groups * d.w * c;
        let slot_len = self.slot_len(work);
        let group_len = DW_GROUP * c;
        let work_at = (ring_len + group_len).next_multiple_of(ALIGN);
        // Each ring starts on a cache line (whole-line vector loads): the
        // scratch has one line to spare.
        let skip = scratch.as_ptr().align_offset(ALIGN * 4).min(ALIGN);
        let scratch = &mut scratch[skip..];
        let dst = match &mut output {
            DwOut::F32(y) => Dst::F32(SyncPtr::new(y)),
            DwOut::I8(y, s) => Dst::I8(SyncPtr::new(y), 1.0 / *s),
        };
        let s_ptr = SyncPtr::new(scratch);
        let bands = threads.min(self.oh).max(1);
        let res = residual.map(|r| &r[b * out_img..(b + 1) * out_img]);
        pool.run(bands, &|band, slot| {
            // SAFETY: thread slot `slot` alone uses its part of the
            // scratch (sized for the pool's threads above).
            let ring_ptr = SyncPtr(unsafe { s_ptr.add(slot * slot_len) });
            // SAFETY: the work floats follow this thread's ring and
            // output group, inside its slot.
            let work = unsafe { std::slice::from_raw_parts_mut(ring_ptr.add(work_at), work) };
            let (oy0, oy1) = (band * self.oh / bands, (band + 1) * self.oh / bands);
            let span = (d.kh - 1) * d.dilation[0] + 1;
            let mut next_group: Option<usize> = None;
            for oy in oy0..oy1 {
                // Input rows [lo, hi) of output row `oy`.
                let top = oy * d.stride[0];
                let lo = top.saturating_sub(d.pads[0]).min(d.h);
                let hi = (top + span).saturating_sub(d.pads[0]).min(d.h);
                let mut j = next_group.unwrap_or(lo / ring.rows);
                while j * ring.rows < hi {
                    let r0 = j * ring.rows;
                    let r1 = (r0 + ring.rows).min(d.h);
                    let base = (j % ring.groups) * ring.rows * d.w * c;
                    // SAFETY: the group's rows (r1 − r0 ≤ rows of `w · c`
                    // floats from `base`) lie inside this thread's ring,
                    // which nothing else touches.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(ring_ptr.add(base), (r1 - r0) * d.w * c)
                    };
                    expand(r0 * d.w, r1 * d.w, out, &mut *work);
                    j += 1;
                }
                next_group = Some(j);
                // SAFETY: this thread's ring, written above (no writes
                // while this view lives).
                let held = unsafe { std::slice::from_raw_parts(ring_ptr.0, ring_len) };
                let rr = res.map(|r| &r[oy * row_len..(oy + 1) * row_len]);
                let at = b * out_img + oy * row_len;
                // SAFETY: band `band` alone writes its output rows, inside
                // the output by the assert above; the I8 group buffer
                // follows this thread's ring in the scratch.
                let sink = unsafe {
                    match dst {
                        Dst::F32(y) => {
                            RowOut::F32(std::slice::from_raw_parts_mut(y.add(at), row_len))
                        }
                        Dst::I8(y, inv) => RowOut::I8 {
                            buf: std::slice::from_raw_parts_mut(ring_ptr.add(ring_len), group_len),
                            y: std::slice::from_raw_parts_mut(y.add(at), row_len),
                            inv,
                        },
                    }
                };
                self.depthwise_row(isa, held, dw_w, oy, rr, sink, Some(ring));
            }
        });
    }

    /// Expansion pixels `p0..p1` (every channel) into `io.y`, with the
    /// tiles [`Conv2dNhwc::run`] would use.
    ///
    /// # Safety
    /// As [`Conv2dNhwc::gemm_span`], for every channel.
    unsafe fn expand_span(&self, io: &GemmIo<'_>, p0: usize, p1: usize) {
        let n_panels = self.g.c_out.div_ceil(NR);
        // SAFETY: forwarded.
        unsafe {
            match io.isa {
                Isa::Avx512 if self.long_pointwise(io.k) => {
                    self.gemm_span::<MR512_LONG, 2>(io, (p0, p1), (0, n_panels), 0)
                }
                Isa::Avx512 => self.gemm_span::<MR512, 2>(io, (p0, p1), (0, n_panels), 0),
                _ => self.gemm_span::<MR, 1>(io, (p0, p1), (0, n_panels), 0),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::conv::tests::data;

    pub(crate) fn geo(
        c_in: usize,
        c_out: usize,
        hw: (usize, usize),
        k: usize,
        s: usize,
        groups: usize,
    ) -> Conv2dGeometry {
        let p = k / 2;
        Conv2dGeometry {
            c_in,
            h: hw.0,
            w: hw.1,
            c_out,
            kh: k,
            kw: k,
            stride: [s, s],
            pads: [p, p, p, p],
            dilation: [1, 1],
            groups,
        }
    }

    /// The fused run against the two layers run one after the other, bit
    /// for bit: f32 and INT8 output, with and without the depthwise
    /// residual, 1 to 3 threads, two images.
    fn check(
        c_in: usize,
        c: usize,
        hw: (usize, usize),
        k: usize,
        s: usize,
        acts: (Activation, Activation),
    ) {
        let e = Conv2dNhwc::new(
            Conv2dGeometry {
                kh: 1,
                kw: 1,
                pads: [0; 4],
                ..geo(c_in, c, hw, 1, 1, 1)
            },
            &data(c * c_in, 1),
            Some(&data(c, 2)),
            acts.0,
        )
        .unwrap();
        let d = Conv2dNhwc::new(
            geo(c, c, hw, k, s, c),
            &data(c * k * k, 3),
            Some(&data(c, 4)),
            acts.1,
        )
        .unwrap();
        assert!(e.fuses_into(&d));
        let batch = 2;
        let x = data(batch * hw.0 * hw.1 * c_in, 5);
        let (oh, ow) = d.out_hw();
        let n_out = batch * oh * ow * c;
        let res = data(n_out, 6);
        for threads in 1..=3 {
            let pool = ThreadPool::new(threads);
            let mut mid = vec![0.0; batch * hw.0 * hw.1 * c];
            e.run(&pool, batch, &x, None, &mut mid);
            for r in [None, Some(&res[..])] {
                let mut want = vec![0.0; n_out];
                d.run(&pool, batch, &mid, r, &mut want);
                let mut got = vec![f32::NAN; n_out];
                let mut scratch = vec![f32::NAN; e.fused_scratch_len(&d, threads)];
                e.run_expand_depthwise(&d, &pool, batch, &x, r, DwOut::F32(&mut got), &mut scratch);
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "f32: {c_in}->{c} at {hw:?}, {k}x{k} s{s}, {threads} threads, residual {}",
                    r.is_some()
                );
                let scale = 0.05;
                let mut want8 = vec![0i8; n_out];
                let mut s8 = vec![0.0; d.scratch_len_i8(threads)];
                d.run_to_i8(&pool, batch, &mid, r, &mut want8, scale, &mut s8);
                let mut got8 = vec![99i8; n_out];
                e.run_expand_depthwise(
                    &d,
                    &pool,
                    batch,
                    &x,
                    r,
                    DwOut::I8(&mut got8, scale),
                    &mut scratch,
                );
                assert_eq!(
                    want8, got8,
                    "i8: {c_in}->{c} at {hw:?}, {k}x{k} s{s}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn fused_expansion_matches_the_two_layers() {
        let relu6 = Activation::Clip { lo: 0.0, hi: 6.0 };
        // Rows one group each (wide), several rows per group, a partial
        // last group, strides 1 and 2, 3×3 and 5×5, odd widths.
        check(16, 96, (20, 150), 3, 2, (relu6, relu6));
        check(24, 40, (17, 30), 3, 1, (relu6, relu6));
        check(
            8,
            24,
            (13, 13),
            5,
            1,
            (Activation::HardSwish, Activation::HardSwish),
        );
        check(8, 36, (14, 9), 5, 2, (Activation::Relu, Activation::None));
        check(5, 20, (3, 7), 3, 1, (relu6, relu6));
    }

    #[test]
    fn layers_that_do_not_fuse_are_told_apart() {
        let layer = |g: Conv2dGeometry, seed| {
            let n = g.c_out * g.c_in / g.groups * g.kh * g.kw;
            Conv2dNhwc::new(g, &data(n, seed), None, Activation::None).unwrap()
        };
        let e = layer(geo(8, 16, (8, 8), 1, 1, 1), 1);
        let spatial = layer(geo(8, 16, (8, 8), 3, 1, 1), 1);
        let d = layer(geo(16, 16, (8, 8), 3, 1, 16), 2);
        let other = layer(geo(16, 16, (9, 8), 3, 1, 16), 2);
        assert!(e.fuses_into(&d));
        assert!(!spatial.fuses_into(&d), "a 3x3 expansion");
        assert!(!e.fuses_into(&other), "sizes differ");
        assert!(!d.fuses_into(&d), "a depthwise expansion");
        assert!(!e.fuses_into(&e), "a gemm reader");
    }
}
