//! The depthwise form: f32 sums of integer values vectorised over channels
//! (`dw512`), or `vpdpbusd` over four-column quads (`dwq`).

use super::*;

/// A depthwise layer's weights for `vpdpbusd`: each kernel row's taps in
/// groups of four, so one instruction sums four taps of 16 channels.
#[derive(Clone, Debug)]
pub(super) struct DwQuads {
    /// `[kh][nq][cblocks][NB][4]`; taps past `kw` are zero.
    w: Vec<i8>,
    /// `-128 · Σ_kx w` per kernel row and (padded) channel,
    /// `[kh][cblocks · NB]`: removes the `+128` of the unsigned inputs.
    comp: Vec<i32>,
    /// Groups of four taps per kernel row.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    nq: usize,
}

impl DwQuads {
    /// Most taps per kernel row (and kernel rows) the form takes.
    const MAX_KW: usize = 16;

    /// Bytes of weights and compensation sums.
    pub(super) fn bytes(&self) -> usize {
        self.w.len() + self.comp.len() * 4
    }

    /// The form for `g`, where it pays: kernels of 5 taps per row or more,
    /// and 3 or more at stride 2. Laying out a row as quads costs about
    /// one `vpermb` per column and 16 channels (only the columns pixels
    /// start at: every other one at stride 2), so at stride 1 it must
    /// replace at least five FMAs per kernel row; at stride 2 the
    /// alternative widens two input pixels per output pixel. Criterion,
    /// INT8 in/out, 1 thread, against [`dw512`] (same build): 3×3 stride 2
    /// 96 ch at 112² −19%, 5×5 stride 2 144 ch at 56² −17%, 5×5 240 ch at
    /// 28² −24%, 5×5 1152 ch at 7² −21%; 3×3 stride 1 was even or slower
    /// (128 ch at 128², 144 ch at 56²).
    pub(super) fn new(g: &Conv2dGeometry, q: &[i8], cblocks: usize) -> Option<DwQuads> {
        if g.dilation != [1, 1]
            || !(g.stride == [1, 1] || g.stride == [2, 2])
            || g.kw < 3
            || (g.kw < 5 && g.stride == [1, 1])
            || g.kw > Self::MAX_KW
            || g.kh > Self::MAX_KW
        {
            return None;
        }
        let (kh, kw, c) = (g.kh, g.kw, g.c_out);
        let nq = kw.div_ceil(4);
        let cpad = cblocks * NB;
        let mut w = vec![0i8; kh * nq * cpad * 4];
        let mut comp = vec![0i32; kh * cpad];
        for ch in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let v = q[(ch * kh + ky) * kw + kx];
                    w[((ky * nq + kx / 4) * cpad + ch) * 4 + kx % 4] = v;
                    comp[ky * cpad + ch] -= 128 * v as i32;
                }
            }
        }
        Some(DwQuads { w, comp, nq })
    }
}

/// `$f::<N>(args)` for the pixel count `n` (1 to 8; the depthwise
/// kernels keep N pixels' sums in registers).
#[cfg(target_arch = "x86_64")]
macro_rules! by_count {
    ($n:expr, $f:ident($($a:expr),*)) => {
        match $n {
            8 => $f::<8>($($a),*),
            7 => $f::<7>($($a),*),
            6 => $f::<6>($($a),*),
            5 => $f::<5>($($a),*),
            4 => $f::<4>($($a),*),
            3 => $f::<3>($($a),*),
            2 => $f::<2>($($a),*),
            _ => $f::<1>($($a),*),
        }
    };
}

impl QConv2dNhwc {
    /// Depthwise: output rows `rows` of one image, channel blocks
    /// `blocks` (of [`NB`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn depthwise_rows(
        &self,
        w: &[f32],
        x: QIn,
        res: Option<&[f32]>,
        y: Dst,
        rows: std::ops::Range<usize>,
        blocks: std::ops::Range<usize>,
        slot: &mut [f32],
    ) {
        let g = &self.g;
        let c = g.c_out;
        let isa = isa::active();
        #[cfg(target_arch = "x86_64")]
        if let Some(q) = &self.dwq {
            // SAFETY: `dwq` is built only where AVX-512 F/BW/VL, VNNI and
            // VBMI are present (`new`); the slot holds `quad_offsets` bytes
            // (slot_bytes); the rows and blocks are this task's own.
            unsafe { dwq::rows(self, q, x, res, y, rows, blocks, slot) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx512() && g.kh * g.kw <= dw512::MAX_TAPS && self.window() <= 64 {
            let (_, ring) = slot.split_at_mut(self.ow * c);
            // SAFETY: AVX-512 F/BW/VL are present; `ring` holds window()
            // padded rows (slot_bytes); the rows and blocks are this
            // task's own.
            unsafe { dw512::rows(self, w, x, res, y, rows, blocks, ring) };
            return;
        }
        // Channels c0..c1 of every pixel: one run of n per pixel in `acc`.
        let (c0, c1) = self.block_chans(&blocks);
        let n = c1 - c0;
        let (acc, xrow) = slot.split_at_mut(self.ow * c);
        let acc = &mut acc[..self.ow * n];
        let xrow = &mut xrow[..g.w * c];
        for oy in rows {
            acc.fill(0.0);
            for ky in 0..g.kh {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let src = iy as usize * g.w * c;
                for ix in 0..g.w {
                    let (a, d) = (src + ix * c + c0, ix * c + c0);
                    match x {
                        QIn::F32(s) => crate::int8::quantize_to_f32(
                            isa,
                            &s[a..a + n],
                            self.inv_input_scale,
                            &mut xrow[d..d + n],
                        ),
                        QIn::I8(s) => widen(isa, &s[a..a + n], &mut xrow[d..d + n]),
                    }
                }
                for kx in 0..g.kw {
                    let t = (ky * g.kw + kx) * c;
                    let wt = &w[t + c0..t + c1];
                    for ox in 0..self.ow {
                        let ix =
                            (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pads[1] as isize;
                        if ix < 0 || ix >= g.w as isize {
                            continue;
                        }
                        let xs = &xrow[ix as usize * c + c0..ix as usize * c + c1];
                        fma_row(isa, &mut acc[ox * n..(ox + 1) * n], xs, wt);
                    }
                }
            }
            let o0 = oy * self.ow * c;
            if n == c {
                let res_row = res.map(|r| &r[o0..o0 + self.ow * c]);
                self.finish(isa, acc, 0..c, res_row, y, o0);
            } else {
                for (ox, v) in acc.chunks_exact_mut(n).enumerate() {
                    let o = o0 + ox * c + c0;
                    self.finish(isa, v, c0..c1, res.map(|r| &r[o..o + n]), y, o);
                }
            }
        }
    }
}

/// INT8 values to f32 (16 per instruction with AVX-512: the depthwise
/// path widens every input row once, and with stride 2 that is as many
/// values as it multiplies).
fn widen(isa: Isa, src: &[i8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx512() {
        // SAFETY: AVX-512 F is present.
        unsafe { widen_avx512(src, dst) };
        return;
    }
    crate::int8::widen_i8(isa, src, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(src: &[i8], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let len = src.len().min(dst.len());
    let n = len / 16 * 16;
    for i in (0..n).step_by(16) {
        // SAFETY: 16 bytes read and 16 floats written at i < n.
        unsafe {
            let b = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm512_storeu_ps(
                dst.as_mut_ptr().add(i),
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)),
            );
        }
    }
    for (d, &s) in dst[n..len].iter_mut().zip(&src[n..len]) {
        *d = s as f32;
    }
}

/// `acc += x · w`, element-wise (exact on the integer values it sees).
fn fma_row(isa: Isa, acc: &mut [f32], x: &[f32], w: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx512() {
        // SAFETY: AVX-512 F is present.
        unsafe { fma_row_avx512(acc, x, w) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 and FMA are present.
        unsafe { fma_row_avx2(acc, x, w) };
        return;
    }
    let _ = isa;
    fma_row_body(acc, x, w);
}

#[inline(always)]
fn fma_row_body(acc: &mut [f32], x: &[f32], w: &[f32]) {
    for ((a, &xv), &wv) in acc.iter_mut().zip(x).zip(w) {
        // Exact either way (integer values below 2^24): a plain
        // multiply-add, which vectorises on every target.
        *a += xv * wv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_row_avx512(acc: &mut [f32], x: &[f32], w: &[f32]) {
    fma_row_body(acc, x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_row_avx2(acc: &mut [f32], x: &[f32], w: &[f32]) {
    fma_row_body(acc, x, w)
}

/// Depthwise with AVX-512 VNNI: `vpdpbusd` sums four taps of 16 channels
/// in one instruction, so each input row is laid out once as "quads": for
/// every column and channel, the unsigned bytes (`x + 128`) of that column
/// and the next three. A kernel row of `kw` taps is then `⌈kw/4⌉`
/// instructions per pixel (one for 3×3, two for 5×5) against `kw` FMAs in
/// [`dw512`]. The sums are exact INT32: the same results as every other
/// form, bit for bit. Pad columns hold `128` (a zero), and each output
/// row's sums start at `-128 · Σ w` over the kernel rows inside the image.
#[cfg(target_arch = "x86_64")]
mod dwq {
    use super::*;
    use std::arch::x86_64::*;

    /// Output rows `rows` of one image.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, VNNI and VBMI must be present; `slot` holds
    /// [`QConv2dNhwc::quad_offsets`]`().3` bytes from a 64-byte boundary;
    /// the output rows are the caller's own.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    pub(super) unsafe fn rows(
        l: &QConv2dNhwc,
        q: &DwQuads,
        x: QIn,
        res: Option<&[f32]>,
        y: Dst,
        rows: std::ops::Range<usize>,
        blocks: std::ops::Range<usize>,
        slot: &mut [f32],
    ) {
        let g = &l.g;
        let c = g.c_out;
        let cbs = l.cblocks;
        let (c0, c1) = l.block_chans(&blocks);
        let cpad = cbs * NB;
        let win = l.window();
        let pcols = g.pads[1] + g.w + g.pads[3];
        let tcols = pcols + 3;
        // Bytes per ring column (every channel block's quads).
        let rq = cbs * 64;
        let (o_stage, o_q8, o_ring, total) = l.quad_offsets();
        debug_assert!(slot.len() * 4 >= total);
        let base = slot.as_mut_ptr() as *mut u8;
        let corr = base as *mut i32;
        // The corrections, the staging row, the quantized row and the ring
        // are disjoint byte ranges of the slot (`quad_offsets`), each on a
        // 64-byte boundary.
        // SAFETY: o_stage < total ≤ the slot's bytes.
        let stage = unsafe { base.add(o_stage) };
        // SAFETY: w·c bytes from o_q8 lie before o_ring.
        let q8 = unsafe { std::slice::from_raw_parts_mut(base.add(o_q8) as *mut i8, g.w * c) };
        // SAFETY: o_ring < total ≤ the slot's bytes.
        let ring = unsafe { base.add(o_ring) };
        let clamp = crate::gemm::in_register_clamp(l.act);
        // Byte 4·ch + k of a quad is byte 16·k + ch of four staged
        // columns.
        let idx = {
            let mut b = [0u8; 64];
            for (i, v) in b.iter_mut().enumerate() {
                *v = ((i % 4) * 16 + i / 4) as u8;
            }
            // Hidden from the optimizer: as a known constant, LLVM
            // rewrites the one `vpermb` into ten unpacks and inserts.
            let b = std::hint::black_box(b);
            // SAFETY: 64 bytes.
            unsafe { _mm512_loadu_si512(b.as_ptr() as *const _) }
        };
        // The staging row's pad columns (and the three past the end) are
        // zeros for the whole call.
        for cb in blocks.clone() {
            for col in (0..g.pads[1]).chain(g.pads[1] + g.w..tcols) {
                // SAFETY: column col < tcols of block cb.
                unsafe {
                    _mm_storeu_si128(
                        stage.add((cb * tcols + col) * NB) as *mut __m128i,
                        _mm_setzero_si128(),
                    )
                };
            }
        }
        let mut held = [usize::MAX; 64];
        let mut taps = [std::ptr::null::<u8>(); DwQuads::MAX_KW];
        let mut kys = [0usize; DwQuads::MAX_KW];
        for oy in rows {
            let mut nt = 0;
            for ky in 0..g.kh {
                let iy = (oy * g.stride[0] + ky) as isize - g.pads[0] as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let iy = iy as usize;
                let s = iy % win;
                // SAFETY: ring slot s of `win`.
                let dst = unsafe { ring.add(s * pcols * rq) };
                if held[s] != iy {
                    let src = iy * g.w * c;
                    let row: &[i8] = match x {
                        QIn::I8(v) => &v[src..src + g.w * c],
                        QIn::F32(v) => {
                            // This task's channels of each pixel.
                            for ix in 0..g.w {
                                let (a, d) = (src + ix * c, ix * c);
                                crate::int8::quantize_to_i8(
                                    Isa::Avx512,
                                    &v[a + c0..a + c1],
                                    l.inv_input_scale,
                                    &mut q8[d + c0..d + c1],
                                );
                            }
                            q8
                        }
                    };
                    // SAFETY: `row` holds w·c bytes; the stage and ring
                    // rows are sized for every column and block.
                    unsafe {
                        build(
                            row,
                            c,
                            cbs,
                            blocks.clone(),
                            g.stride[1],
                            g.pads[1],
                            g.w,
                            tcols,
                            pcols,
                            stage,
                            dst,
                            idx,
                        )
                    };
                    held[s] = iy;
                }
                taps[nt] = dst;
                kys[nt] = ky;
                nt += 1;
            }
            // This row's corrections: the kernel rows inside the image.
            for cb in blocks.clone() {
                // SAFETY: `comp` holds kh rows of cpad; `corr` cpad i32.
                unsafe {
                    let mut v = _mm512_setzero_si512();
                    for &ky in &kys[..nt] {
                        v = _mm512_add_epi32(
                            v,
                            _mm512_loadu_si512(q.comp.as_ptr().add(ky * cpad + cb * NB) as *const _),
                        );
                    }
                    _mm512_store_si512(corr.add(cb * NB) as *mut _, v);
                }
            }
            let t = Rows {
                taps: &taps[..nt],
                kys: &kys[..nt],
                nq: q.nq,
                w: q.w.as_ptr(),
                cpad,
                rq,
                step: g.stride[1] * rq,
            };
            let o_row = oy * l.ow * c;
            let mut ox = 0;
            while ox < l.ow {
                let n = (l.ow - ox).min(8);
                for cb in blocks.clone() {
                    // SAFETY: forwarded contract; the quads of pixel
                    // ox + j lie in the ring rows (pcols columns).
                    unsafe { by_count!(n, pixels(l, &t, corr, cb, ox, o_row, res, y, clamp)) }
                }
                ox += n;
            }
        }
    }

    /// Lays out input row `row` (`w` pixels of `c` INT8 channels) as quads
    /// in `dst`: first each block of 16 channels, one 16-byte run per
    /// padded column (`stage`, `[cbs][tcols][16]`; the pad columns are
    /// already zero), then each column's four-column window of a block
    /// transposed by one `vpermb` into `[ch][4]` and made unsigned.
    ///
    /// # Safety
    /// As [`rows`]; `stage` holds `cbs · tcols · 16` bytes, `dst`
    /// `pcols · cbs · 64`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    unsafe fn build(
        row: &[i8],
        c: usize,
        cbs: usize,
        blocks: std::ops::Range<usize>,
        stride: usize,
        left: usize,
        w: usize,
        tcols: usize,
        pcols: usize,
        stage: *mut u8,
        dst: *mut u8,
        idx: __m512i,
    ) {
        // SAFETY: channels cb·16.. under the mask of pixel ix lie in `row`;
        // the stage and ring offsets are inside their sizes.
        unsafe {
            // Staged as they are (the +128 comes after the transpose, one
            // XOR per 64 bytes); a last partial block's missing channels
            // stage as zeros (their weights are zero).
            let full = (c / NB).min(blocks.end);
            let m: __mmask16 = (1u16 << (c % NB)).wrapping_sub(1);
            for ix in 0..w {
                let src = row.as_ptr().add(ix * c);
                let st = stage.add((left + ix) * NB);
                for cb in blocks.start..full {
                    let v = _mm_loadu_si128(src.add(cb * NB) as *const __m128i);
                    _mm_storeu_si128(st.add(cb * tcols * NB) as *mut __m128i, v);
                }
                if full < blocks.end {
                    let v = _mm_maskz_loadu_epi8(m, src.add(full * NB));
                    _mm_storeu_si128(st.add(full * tcols * NB) as *mut __m128i, v);
                }
            }
            let flip = _mm512_set1_epi8(-128);
            // Only the columns output pixels start at (every other one
            // at stride 2).
            for col in (0..pcols).step_by(stride) {
                for cb in blocks.clone() {
                    let v = _mm512_loadu_si512(stage.add((cb * tcols + col) * NB) as *const _);
                    _mm512_store_si512(
                        dst.add((col * cbs + cb) * 64) as *mut _,
                        _mm512_xor_si512(_mm512_permutexvar_epi8(idx, v), flip),
                    );
                }
            }
        }
    }

    /// One output row's kernel rows inside the image.
    struct Rows<'a> {
        /// Ring row of each.
        taps: &'a [*const u8],
        /// Its kernel row.
        kys: &'a [usize],
        nq: usize,
        /// [`DwQuads::w`].
        w: *const i8,
        cpad: usize,
        /// Bytes per ring column.
        rq: usize,
        /// Bytes from one output pixel's first column to the next's.
        step: usize,
    }

    /// `N` pixels from `ox` on, 16 channels from block `cb`.
    ///
    /// # Safety
    /// As [`rows`]; `t` and `corr` as [`rows`] builds them.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    unsafe fn pixels<const N: usize>(
        l: &QConv2dNhwc,
        t: &Rows,
        corr: *const i32,
        cb: usize,
        ox: usize,
        o_row: usize,
        res: Option<&[f32]>,
        y: Dst,
        clamp: Option<(f32, f32)>,
    ) {
        let c = l.g.c_out;
        // SAFETY: forwarded contract: every quad read lies in a ring row,
        // every weight in `w`.
        unsafe {
            let mut acc = [_mm512_load_si512(corr.add(cb * NB) as *const _); N];
            let first = ox * t.step + cb * 64;
            for (&rp, &ky) in t.taps.iter().zip(t.kys) {
                for qi in 0..t.nq {
                    let wv = _mm512_loadu_si512(
                        t.w.add(((ky * t.nq + qi) * t.cpad + cb * NB) * 4) as *const _
                    );
                    let xp = rp.add(first + qi * 4 * t.rq);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_dpbusd_epi32(
                            *a,
                            _mm512_loadu_si512(xp.add(j * t.step) as *const _),
                            wv,
                        );
                    }
                }
            }
            let mut sums = [_mm512_setzero_ps(); N];
            for (s, a) in sums.iter_mut().zip(&acc) {
                *s = _mm512_cvtepi32_ps(*a);
            }
            epi512::block_inline(
                l,
                &mut sums,
                o_row + ox * c + cb * NB,
                c,
                cb * NB,
                res,
                y,
                clamp,
            );
        }
    }
}

/// Depthwise with AVX-512: the input rows of the window widened to f32 once
/// each into a ring of rows padded with zero columns, so groups of pixels
/// take every tap without a check (single pixels skip their zero columns,
/// and kernel rows outside the image are skipped); sums of up to eight
/// pixels × 16 channels in registers, one weight load per tap shared by
/// the pixels.
#[cfg(target_arch = "x86_64")]
mod dw512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Most taps this path takes (up to 8×8 kernels; larger ones run the
    /// portable path).
    pub(super) const MAX_TAPS: usize = 64;

    /// Input columns the sliding-window sums hold in registers (8 pixels
    /// and up to 5 taps per row).
    const SLIDE_COLS: usize = 12;

    /// Output rows `rows` of one image.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be present; `kh·kw ≤ MAX_TAPS`
    /// and `window() ≤ 64`; `ring` holds `window()` padded rows
    /// ([`QConv2dNhwc::padded_row`] floats each); the output rows are the
    /// caller's own.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn rows(
        l: &QConv2dNhwc,
        w: &[f32],
        x: QIn,
        res: Option<&[f32]>,
        y: Dst,
        rows: std::ops::Range<usize>,
        blocks: std::ops::Range<usize>,
        ring: &mut [f32],
    ) {
        let g = &l.g;
        let c = g.c_out;
        let win = l.window();
        let row_len = g.w * c;
        let prow = l.padded_row();
        let (left, right) = (g.pads[1] * c, prow - g.pads[1] * c - row_len);
        let (c0, c1) = l.block_chans(&blocks);
        let clamp = crate::gemm::in_register_clamp(l.act);
        // The pad columns are zero for the whole call; widening writes
        // between them only.
        for r in 0..win {
            let row = &mut ring[r * prow..(r + 1) * prow];
            row[..left].fill(0.0);
            row[prow - right..].fill(0.0);
        }
        // Which input row each ring slot holds.
        let mut held = [usize::MAX; 64];
        // Per kernel row inside the image, its kw taps: (weights of
        // channel 0, input of padded column kx·d).
        let mut taps = [(std::ptr::null::<f32>(), std::ptr::null::<f32>()); MAX_TAPS];
        // The kernel columns inside the image for output column ox.
        let kx_range = |ox: usize| {
            let first = (ox * g.stride[1]) as isize - g.pads[1] as isize;
            let d = g.dilation[1] as isize;
            let a = (0..g.kw)
                .find(|&kx| first + kx as isize * d >= 0)
                .unwrap_or(g.kw);
            let b = (0..g.kw)
                .rev()
                .find(|&kx| first + (kx as isize * d) < g.w as isize)
                .map_or(0, |kx| kx + 1);
            (a, b.max(a))
        };
        for oy in rows {
            let mut nt = 0;
            for ky in 0..g.kh {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                if iy < 0 || iy >= g.h as isize {
                    // Zero rows add nothing: no taps.
                    continue;
                }
                let iy = iy as usize;
                let slot = iy % win;
                if held[slot] != iy {
                    let dst = &mut ring[slot * prow + left..slot * prow + left + row_len];
                    let src = iy * row_len;
                    // The whole row as one run, or this task's channels of
                    // each pixel: runs of `run` every `span` from `off`.
                    let (span, off, run) = if (c0, c1) == (0, c) {
                        (row_len, 0, row_len)
                    } else {
                        (c, c0, c1 - c0)
                    };
                    for (k, d) in dst.chunks_exact_mut(span).enumerate() {
                        let (a, d) = (src + k * span + off, &mut d[off..off + run]);
                        match x {
                            QIn::F32(s) => crate::int8::quantize_to_f32(
                                Isa::Avx512,
                                &s[a..a + run],
                                l.inv_input_scale,
                                d,
                            ),
                            // SAFETY: AVX-512 F is enabled here (inlined:
                            // runs of one pixel's channels are short).
                            QIn::I8(s) => unsafe { super::widen_avx512(&s[a..a + run], d) },
                        }
                    }
                    held[slot] = iy;
                }
                let rp = ring[slot * prow..].as_ptr();
                for kx in 0..g.kw {
                    // SAFETY: kh·kw rows of c weights; column kx·d of the
                    // padded row.
                    taps[nt] = unsafe {
                        (
                            w.as_ptr().add((ky * g.kw + kx) * c),
                            rp.add(kx * g.dilation[1] * c),
                        )
                    };
                    nt += 1;
                }
            }
            let o_row = oy * l.ow * c;
            let t = Taps {
                taps: &taps[..nt],
                kw: g.kw,
                slide: g.stride[1] == 1 && g.dilation[1] == 1,
            };
            let mut ox = 0;
            while ox < l.ow {
                // Groups of up to 8 pixels take every column (the zero pad
                // columns included: one weight load serves the whole
                // group), a row's rest in one group (14 = 8 + 6, 7 = 7);
                // single pixels skip the columns outside the image.
                let n = (l.ow - ox).min(8);
                let kx = if n == 1 { kx_range(ox) } else { (0, g.kw) };
                // Every block of 16 channels of the group before the next
                // group: the group's input pixels are whole runs of
                // memory the prefetchers stream, and stay in L1 across
                // the blocks.
                for cb in (c0..c1).step_by(NB) {
                    // SAFETY: forwarded contract; every tap summed lies in
                    // the padded rows.
                    unsafe { by_count!(n, pixels(l, &t, kx, cb, ox, o_row, res, y, clamp)) }
                }
                ox += n;
            }
        }
    }

    /// The taps of one output row: `kw` per kernel row inside the image.
    struct Taps<'a> {
        taps: &'a [(*const f32, *const f32)],
        kw: usize,
        /// Stride 1 and no dilation along the row: tap `kx` of pixel `j`
        /// is input column `j + kx`, so a row's taps for a group of pixels
        /// are a sliding window over `N + kw − 1` columns.
        slide: bool,
    }

    /// 16 floats at `p`: the channels under `mask` when `MASKED`, else
    /// all 16 (an unmasked load folds into a multiply-add).
    ///
    /// # Safety
    /// AVX-512 F; `p` valid for the channels loaded.
    #[inline(always)]
    unsafe fn load<const MASKED: bool>(mask: __mmask16, p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            if MASKED {
                _mm512_maskz_loadu_ps(mask, p)
            } else {
                _mm512_loadu_ps(p)
            }
        }
    }

    /// Sums of `N` pixels × 16 channels from `cb` over the taps of kernel
    /// columns `kx.0..kx.1` (weights of channel 0, input of padded column
    /// 0; pixel j reads `base + j · step` floats further, `base` including
    /// `cb`). Full blocks load unmasked (the loads fold into the
    /// multiply-adds).
    ///
    /// # Safety
    /// AVX-512 F; every pointer valid for the channels under `mask`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn sums<const N: usize, const MASKED: bool>(
        t: &Taps,
        kx: (usize, usize),
        cb: usize,
        base: usize,
        step: usize,
        mask: __mmask16,
    ) -> [__m512; N] {
        // SAFETY: forwarded contract.
        let ld = |p: *const f32| unsafe { load::<MASKED>(mask, p) };
        let mut acc = [_mm512_setzero_ps(); N];
        macro_rules! tap {
            ($wp:expr, $xp:expr) => {
                // SAFETY: forwarded contract.
                unsafe {
                    let wv = ld($wp.add(cb));
                    let xp = $xp.add(base);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(ld(xp.add(j * step)), wv, *a);
                    }
                }
            };
        }
        if kx == (0, t.kw) && t.slide && matches!(t.kw, 3 | 5) {
            // A sliding window: each of the row's `N + kw − 1` input
            // columns is loaded once for every pixel and tap that reads it
            // (a 3-tap row of 8 pixels: 10 loads, not 24), so the
            // multiply-adds, not the loads, set the pace.
            // SAFETY: forwarded contract.
            unsafe {
                if t.kw == 3 {
                    slide::<N, 3, MASKED>(&mut acc, t, cb, base, step, mask);
                } else {
                    slide::<N, 5, MASKED>(&mut acc, t, cb, base, step, mask);
                }
            }
        } else if kx == (0, t.kw) {
            // All columns: one flat loop (short rows would cost a loop
            // each).
            for &(wp, xp) in t.taps {
                tap!(wp, xp);
            }
        } else {
            for row in t.taps.chunks_exact(t.kw) {
                for &(wp, xp) in &row[kx.0..kx.1] {
                    tap!(wp, xp);
                }
            }
        }
        acc
    }

    /// [`sums`] over whole rows of `KW` taps at stride 1 without
    /// dilation: column `j + kx` of the group's first pixel is pixel `j`'s
    /// tap `kx`. The `N + KW − 1` columns stay in registers (constant
    /// indices once unrolled).
    ///
    /// # Safety
    /// As [`sums`]; `t.kw == KW` and `t.slide`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn slide<const N: usize, const KW: usize, const MASKED: bool>(
        acc: &mut [__m512; N],
        t: &Taps,
        cb: usize,
        base: usize,
        step: usize,
        mask: __mmask16,
    ) {
        // SAFETY: forwarded contract.
        let ld = |p: *const f32| unsafe { load::<MASKED>(mask, p) };
        for row in t.taps.chunks_exact(KW) {
            // SAFETY: forwarded contract: the window's columns lie in the
            // padded row, the weights in the kernel.
            unsafe {
                let xp = row[0].1.add(base);
                let mut cols = [_mm512_setzero_ps(); SLIDE_COLS];
                for (j, col) in cols.iter_mut().enumerate().take(N + KW - 1) {
                    *col = ld(xp.add(j * step));
                }
                for k in 0..KW {
                    let wv = ld(row[k].0.add(cb));
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(cols[j + k], wv, *a);
                    }
                }
            }
        }
    }

    /// `N` pixels from `ox` on, 16 channels from `cb`, kernel columns
    /// `kx.0..kx.1` (the others must be zero pad columns for every pixel).
    ///
    /// # Safety
    /// As [`rows`]; `t` as [`rows`] builds it.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pixels<const N: usize>(
        l: &QConv2dNhwc,
        t: &Taps,
        kx: (usize, usize),
        cb: usize,
        ox: usize,
        o_row: usize,
        res: Option<&[f32]>,
        y: Dst,
        clamp: Option<(f32, f32)>,
    ) {
        let c = l.g.c_out;
        let step = l.g.stride[1] * c;
        let lanes = NB.min(c - cb);
        let mask: __mmask16 = if lanes == NB {
            0xffff
        } else {
            (1u16 << lanes) - 1
        };
        let base = ox * step + cb;
        // SAFETY: forwarded contract (channels cb.. under `mask`).
        let acc = unsafe {
            if lanes == NB {
                sums::<N, false>(t, kx, cb, base, step, mask)
            } else {
                sums::<N, true>(t, kx, cb, base, step, mask)
            }
        };
        let mut acc = acc;
        // SAFETY: this task's output row; caller's contract.
        unsafe { epi512::block_inline(l, &mut acc, o_row + ox * c + cb, c, cb, res, y, clamp) };
    }
}
