//! The one-group form: packed input patches and the VNNI (or portable)
//! tile of 12 pixels × 32 output channels.

use super::*;

impl QConv2dNhwc {
    /// Packs the input patches of output pixels `p0..p0+n` as `x + 128`
    /// bytes, one row of `kq·4` per pixel: a pointwise layer's rows are
    /// the input's own (one contiguous run), and a kernel row inside the
    /// image is one run of `kw·c_in` bytes.
    pub(super) fn pack(&self, x: &[i8], p0: usize, n: usize, packed: &mut [u8]) {
        let g = &self.g;
        let row = self.kq * 4;
        if g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.pads == [0; 4] && row == g.c_in {
            offset_i8(&x[p0 * row..(p0 + n) * row], &mut packed[..n * row]);
            return;
        }
        let run = g.kw * g.c_in;
        for i in 0..n {
            let p = p0 + i;
            let (oy, ox) = (p / self.ow, p % self.ow);
            let dst = &mut packed[i * row..(i + 1) * row];
            let ix0 = (ox * g.stride[1]) as isize - g.pads[1] as isize;
            let whole = g.dilation[1] == 1 && ix0 >= 0 && ix0 as usize + g.kw <= g.w;
            for ky in 0..g.kh {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                let d0 = ky * run;
                if iy < 0 || iy >= g.h as isize {
                    dst[d0..d0 + run].fill(128);
                    continue;
                }
                let src_row = iy as usize * g.w;
                if whole {
                    let s0 = (src_row + ix0 as usize) * g.c_in;
                    offset_i8(&x[s0..s0 + run], &mut dst[d0..d0 + run]);
                    continue;
                }
                for kx in 0..g.kw {
                    let ix = ix0 + (kx * g.dilation[1]) as isize;
                    let d = &mut dst[d0 + kx * g.c_in..d0 + (kx + 1) * g.c_in];
                    if ix < 0 || ix >= g.w as isize {
                        d.fill(128);
                        continue;
                    }
                    let s0 = (src_row + ix as usize) * g.c_in;
                    offset_i8(&x[s0..s0 + g.c_in], d);
                }
            }
            dst[self.k..].fill(128);
        }
    }

    /// The tiles of one packed chunk, output channel blocks `blocks`.
    pub(super) fn gemm_chunk(
        &self,
        packed: &[u8],
        p0: usize,
        n: usize,
        blocks: std::ops::Range<usize>,
        res: Option<&[f32]>,
        y: Dst,
    ) {
        let row = self.kq * 4;
        #[cfg(target_arch = "x86_64")]
        let clamp = crate::gemm::in_register_clamp(self.act);
        let mut blk = blocks.start;
        while blk < blocks.end {
            let nb = (blocks.end - blk).min(2);
            let mut i = 0;
            while i < n {
                let m = MR.min(n - i);
                let ep = Epi {
                    layer: self,
                    pix: p0 + i,
                    res,
                    y,
                };
                let a = &packed[i * row..(i + m) * row];
                #[cfg(target_arch = "x86_64")]
                if vnni() {
                    // SAFETY: AVX-512 F/BW and VNNI are present; `a` holds
                    // m packed rows, the weights nb blocks from blk; the
                    // epilogue writes this task's own pixels and channels.
                    unsafe { vnni::tile(self, a, m, nb, blk, &ep, clamp) };
                    i += m;
                    continue;
                }
                self.tile_portable(a, m, nb, blk, &ep);
                i += m;
            }
            blk += nb;
        }
    }

    /// Portable tile: the same integer sums as the VNNI one.
    fn tile_portable(&self, a: &[u8], m: usize, nb: usize, blk: usize, ep: &Epi) {
        let row = self.kq * 4;
        let mut acc = [0i32; NB];
        for r in 0..m {
            let pa = &a[r * row..(r + 1) * row];
            for b in blk..blk + nb {
                acc.copy_from_slice(&self.comp[b * NB..(b + 1) * NB]);
                let wb = &self.w[b * self.kq * NB * 4..(b + 1) * self.kq * NB * 4];
                for (q, wq) in wb.chunks_exact(NB * 4).enumerate() {
                    let xq = &pa[q * 4..q * 4 + 4];
                    for (lane, w4) in acc.iter_mut().zip(wq.chunks_exact(4)) {
                        // Wrapping, as vpdpbusd: the offset sums may pass
                        // i32 on the way; the true sum fits (`new` caps k).
                        let s = xq
                            .iter()
                            .zip(w4)
                            .fold(0i32, |s, (&x, &w)| s.wrapping_add(x as i32 * w as i32));
                        *lane = lane.wrapping_add(s);
                    }
                }
                let mut v = [0f32; NB];
                for (o, &s) in v.iter_mut().zip(&acc) {
                    *o = s as f32;
                }
                ep.finish_scalar(r, b, &mut v);
            }
        }
    }
}

/// `x + 128` of INT8 values.
fn offset_i8(src: &[i8], dst: &mut [u8]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = (v as u8) ^ 0x80;
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::epi512::block;
    use super::*;
    use std::arch::x86_64::*;

    /// One tile: `m` (≤ 12) pixels × `nb` (1 or 2) channel blocks.
    ///
    /// # Safety
    /// AVX-512 F/BW and VNNI must be present; `a` holds `m` packed rows;
    /// blocks `blk..blk+nb` exist; the epilogue's outputs are the caller's.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile(
        l: &QConv2dNhwc,
        a: &[u8],
        m: usize,
        nb: usize,
        blk: usize,
        ep: &Epi,
        clamp: Option<(f32, f32)>,
    ) {
        // Constant row counts, so the accumulators stay in registers.
        macro_rules! go {
            ($($m:literal)*) => {
                match (m, nb) {
                    // SAFETY: forwarded contract.
                    $( ($m, 2) => unsafe { tile_mn::<$m, 2>(l, a, blk, ep, clamp) }, )*
                    // SAFETY: forwarded contract.
                    $( ($m, _) => unsafe { tile_mn::<$m, 1>(l, a, blk, ep, clamp) }, )*
                    _ => {}
                }
            };
        }
        go!(1 2 3 4 5 6 7 8 9 10 11 12);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_mn<const M: usize, const N: usize>(
        l: &QConv2dNhwc,
        a: &[u8],
        blk: usize,
        ep: &Epi,
        clamp: Option<(f32, f32)>,
    ) {
        let kq = l.kq;
        let row = kq * 4;
        debug_assert!(a.len() >= M * row);
        let wstride = kq * NB * 4;
        // SAFETY: blocks blk..blk+N hold kq groups of 64 bytes each; rows
        // 0..M of `a` hold kq groups of 4 bytes.
        unsafe {
            let wp = l.w.as_ptr().add(blk * wstride);
            let ap = a.as_ptr();
            let mut acc = [[_mm512_setzero_si512(); N]; M];
            for n in 0..N {
                let c = _mm512_loadu_si512(l.comp.as_ptr().add((blk + n) * NB) as *const _);
                for accm in acc.iter_mut() {
                    accm[n] = c;
                }
            }
            for q in 0..kq {
                let mut b = [_mm512_setzero_si512(); N];
                for (n, bn) in b.iter_mut().enumerate() {
                    *bn = _mm512_loadu_si512(wp.add(n * wstride + q * 64) as *const _);
                }
                for (r, accr) in acc.iter_mut().enumerate() {
                    let x =
                        _mm512_set1_epi32((ap.add(r * row + q * 4) as *const i32).read_unaligned());
                    for n in 0..N {
                        accr[n] = _mm512_dpbusd_epi32(accr[n], x, b[n]);
                    }
                }
            }
            for n in 0..N {
                let mut sums = [_mm512_setzero_ps(); M];
                for (v, accr) in sums.iter_mut().zip(&acc) {
                    *v = _mm512_cvtepi32_ps(accr[n]);
                }
                let c0 = (blk + n) * NB;
                let o0 = ep.pix * l.g.c_out + c0;
                block(l, &mut sums, o0, l.g.c_out, c0, ep.res, ep.y, clamp);
            }
        }
    }
}
