//! The one-group form: packed input patches and the VNNI (or portable)
//! tile of 12 pixels × 32 output channels.

use super::*;

impl QConv2dNhwc {
    /// Packs the input patches of output pixels `p0..p0+n` as `x + 128`
    /// bytes, one row of `wkq·4` per pixel: a pointwise layer's rows are
    /// the input's own (one contiguous run), and a kernel row inside the
    /// image is one run of `kw·c_in` bytes.
    pub(super) fn pack(&self, x: &[i8], p0: usize, n: usize, packed: &mut [u8]) {
        let g = &self.g;
        let row = self.row();
        if self.pointwise() && row == g.c_in {
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
        let row = self.row();
        #[cfg(target_arch = "x86_64")]
        let clamp = crate::gemm::in_register_clamp(self.act);
        #[cfg(target_arch = "x86_64")]
        if self.amx {
            // SAFETY: `amx` is set only where `isa::has_amx_int8` holds
            // (AVX-512 F/BW/VL, AMX-TILE/INT8, the OS's permission);
            // `packed` holds PIX_AMX rows of `row` bytes (the slot's size), n
            // of them packed; the epilogue writes this task's own pixels
            // and channels.
            unsafe {
                amx::chunk(
                    self,
                    amx::Rows::Packed(packed),
                    p0,
                    n,
                    blocks,
                    res,
                    y,
                    clamp,
                )
            };
            return;
        }
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
        let row = self.row();
        let wb_len = self.wkq * NB * 4;
        let mut acc = [0i32; NB];
        for r in 0..m {
            let pa = &a[r * row..(r + 1) * row];
            for b in blk..blk + nb {
                acc.copy_from_slice(&self.comp[b * NB..(b + 1) * NB]);
                let wb = &self.w[b * wb_len..b * wb_len + self.kq * NB * 4];
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
        let row = l.row();
        debug_assert!(a.len() >= M * row);
        let wstride = l.wkq * NB * 4;
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

/// The one-group form on AMX tiles: a tile product multiplies 16 pixel
/// rows × 64 bytes (16 groups of four reduction indices) by the same 16
/// groups × 16 output channels (the weight blocks' own `[wkq][NB][4]`
/// layout, 64 bytes a row) into 16 × 16 INT32 sums: 16 384 products per
/// instruction, the same exact sums as `vpdpbusd`. Packed rows (`x + 128`
/// bytes) use `tdpbusd` with the sums started at the offset's correction,
/// as the VNNI tile; a pointwise layer's rows are read in place from the
/// INT8 input with `tdpbssd` (signed × signed, sums from zero). Tiles of
/// up to 32 pixels × 32 channels: accumulators in tmm0–tmm3, pixel rows in
/// tmm4–tmm5, weights in tmm6–tmm7.
#[cfg(target_arch = "x86_64")]
pub(super) mod amx {
    use super::super::epi512::block;
    use super::super::*;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The `ldtilecfg` operand: palette 1, eight tiles of 16 rows × 64
    /// bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Four accumulator tiles' sums, stored for the epilogue.
    #[repr(C, align(64))]
    struct Sums([[i32; 256]; 4]);

    /// Where a chunk's pixel rows come from.
    pub(in super::super) enum Rows<'a> {
        /// [`QConv2dNhwc::pack`]ed rows (`x + 128`), [`PIX_AMX`] of them.
        Packed(&'a [u8]),
        /// A pointwise layer's INT8 input image, read in place; rows
        /// whose tiles would read past its end are copied to `spare`
        /// (at least [`PIX_AMX`] padded rows) first.
        Direct { x: &'a [i8], spare: &'a mut [u8] },
    }

    /// `tileloadd tmmN, [p + stride·row]` for rows 0..16.
    macro_rules! load {
        ($t:literal, $p:expr, $stride:expr) => {
            asm!(
                concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
                p = in(reg) $p,
                s = in(reg) $stride,
                options(nostack, readonly),
            )
        };
    }
    /// `tdpbssd` (signed rows) or `tdpbusd` (offset rows) `tmmC, tmmA,
    /// tmmB`.
    macro_rules! dot {
        ($signed:expr, $c:literal, $a:literal, $b:literal) => {
            if $signed {
                asm!(
                    concat!("tdpbssd tmm", $c, ", tmm", $a, ", tmm", $b),
                    options(nostack, nomem),
                )
            } else {
                asm!(
                    concat!("tdpbusd tmm", $c, ", tmm", $a, ", tmm", $b),
                    options(nostack, nomem),
                )
            }
        };
    }
    /// Starts accumulator `tmmN`: zero (signed rows) or the correction
    /// row `comp` in all 16 rows (stride 0).
    macro_rules! start {
        ($signed:expr, $t:literal, $comp:expr) => {
            if $signed {
                asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
            } else {
                load!($t, $comp, 0usize)
            }
        };
    }
    /// `tilestored [p + 64·row], tmmN`.
    macro_rules! store {
        ($t:literal, $p:expr) => {
            asm!(
                concat!("tilestored [{p} + {s}*1], tmm", $t),
                p = in(reg) $p,
                s = in(reg) 64usize,
                options(nostack),
            )
        };
    }

    /// The tiles of one chunk (`n` ≤ [`PIX_AMX`] pixels from `p0`),
    /// output channel blocks `blocks`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL present and AMX permitted ([`isa::has_amx_int8`]),
    /// `l.amx` (weights padded to whole tiles); packed rows: [`PIX_AMX`]
    /// rows of `l.row()` bytes (rows past `n` are read and their sums
    /// dropped); direct rows: `l` is pointwise and `x` whole input pixels
    /// (an image, or a run of its pixels) holding pixels `p0..p0+n`;
    /// the outputs the epilogue writes are the caller's.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(in super::super) unsafe fn chunk(
        l: &QConv2dNhwc,
        mut rows: Rows,
        p0: usize,
        n: usize,
        blocks: std::ops::Range<usize>,
        res: Option<&[f32]>,
        y: Dst,
        clamp: Option<(f32, f32)>,
    ) {
        let row = l.row();
        let tiles = l.wkq / 16;
        let block_bytes = l.wkq * NB * 4;
        let cin = l.g.c_in;
        assert!(l.amx && l.wkq.is_multiple_of(16) && n <= PIX_AMX);
        assert!(blocks.end <= l.cblocks && l.w.len() >= l.cblocks * block_bytes);
        let signed = match &rows {
            Rows::Packed(p) => {
                assert!(p.len() >= PIX_AMX * row);
                false
            }
            Rows::Direct { x, spare } => {
                assert!(l.pointwise() && x.len().is_multiple_of(cin) && (p0 + n) * cin <= x.len());
                assert!(spare.len() >= PIX_AMX * row);
                true
            }
        };
        let mut sums = Sums([[0; 256]; 4]);
        // SAFETY: tile loads read 16 rows of 64 bytes: packed rows i..i+32
        // ≤ PIX_AMX (i + 16 < n ≤ PIX_AMX for the second tile); direct rows inside
        // the image (checked per pair below, else read from `spare`);
        // weight rows of blocks < cblocks (asserted above); the
        // corrections' 16 i32 of a block (stride 0: the same row 16 times).
        // Stores write `sums`. The configuration is this thread's,
        // released at the end.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
            let mut blk = blocks.start;
            while blk < blocks.end {
                let two_blocks = blocks.end - blk >= 2;
                let w0 = l.w.as_ptr().add(blk * block_bytes);
                let w1 = w0.add(block_bytes);
                let comp0 = l.comp.as_ptr().add(blk * NB);
                let comp1 = comp0.add(NB);
                let mut i = 0;
                while i < n {
                    let m = (n - i).min(32);
                    let two_tiles = m > 16;
                    let (a0, stride) = match &mut rows {
                        Rows::Packed(p) => (p.as_ptr().add(i * row), row),
                        Rows::Direct { x, spare } => {
                            // The last tile's last row reads up to
                            // `tiles · 64` bytes from its pixel's start.
                            let q = p0 + i;
                            let last = q + if two_tiles { 31 } else { 15 };
                            if last * cin + tiles * 64 <= x.len() {
                                (x.as_ptr().add(q * cin) as *const u8, cin)
                            } else {
                                // The image's end: the rows copied into
                                // padded rows of their own.
                                for r in 0..m {
                                    let src = &x[(q + r) * cin..(q + r + 1) * cin];
                                    let d = &mut spare[r * row..(r + 1) * row];
                                    for (d, &v) in d.iter_mut().zip(src) {
                                        *d = v as u8;
                                    }
                                }
                                (spare.as_ptr(), row)
                            }
                        }
                    };
                    let a1 = a0.add(16 * stride);
                    start!(signed, "0", comp0);
                    if two_blocks {
                        start!(signed, "1", comp1);
                    }
                    if two_tiles {
                        start!(signed, "2", comp0);
                        if two_blocks {
                            start!(signed, "3", comp1);
                        }
                    }
                    for t in 0..tiles {
                        load!("4", a0.add(t * 64), stride);
                        load!("6", w0.add(t * 1024), 64usize);
                        dot!(signed, "0", "4", "6");
                        if two_blocks {
                            load!("7", w1.add(t * 1024), 64usize);
                            dot!(signed, "1", "4", "7");
                        }
                        if two_tiles {
                            load!("5", a1.add(t * 64), stride);
                            dot!(signed, "2", "5", "6");
                            if two_blocks {
                                dot!(signed, "3", "5", "7");
                            }
                        }
                    }
                    let s = sums.0.as_mut_ptr();
                    store!("0", s);
                    if two_blocks {
                        store!("1", s.add(1));
                    }
                    if two_tiles {
                        store!("2", s.add(2));
                        if two_blocks {
                            store!("3", s.add(3));
                        }
                    }
                    for (ti, bi) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        if (bi == 1 && !two_blocks) || (ti == 1 && !two_tiles) {
                            continue;
                        }
                        let rows = (m - ti * 16).min(16);
                        let mut v = [_mm512_setzero_ps(); 16];
                        let src = &sums.0[ti * 2 + bi];
                        for (r, vr) in v.iter_mut().enumerate().take(rows) {
                            let q = _mm512_loadu_si512(src.as_ptr().add(r * 16) as *const _);
                            *vr = _mm512_cvtepi32_ps(q);
                        }
                        let c0 = (blk + bi) * NB;
                        let o0 = (p0 + i + ti * 16) * l.g.c_out + c0;
                        block(l, &mut v[..rows], o0, l.g.c_out, c0, res, y, clamp);
                    }
                    i += m;
                }
                blk += if two_blocks { 2 } else { 1 };
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }
}
