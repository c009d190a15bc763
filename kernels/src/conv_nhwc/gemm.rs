//! The gemm algorithm: implicit-im2col tiles of pixels × panels of 16
//! output channels, A rows read straight from the channels-last input.

use super::{Conv2dNhwc, MAX_TAPS, NR};
use crate::isa::{self, Isa};
use crate::pool::{SyncPtr, ThreadPool};

impl Conv2dNhwc {
    #[allow(clippy::too_many_arguments)]
    /// The gemm algorithm with tiles of `M` pixels × `P` panels.
    pub(super) fn run_gemm<const M: usize, const P: usize>(
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
        let cout = g.c_out;
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
        let pointwise = taps == 1 && g.stride == [1, 1] && g.pads == [0; 4];
        let io = GemmIo {
            isa,
            x,
            res,
            y: SyncPtr::new(y),
            y_first: 0,
            panels,
            k,
            write_ahead: pointwise && pixels * cout >= 128 * 1024,
        };
        let task = |t: usize, _slot: usize| {
            let (bi, ci) = (t / panel_chunks, t % panel_chunks);
            let q0 = ci * per_chunk;
            let q1 = (q0 + per_chunk).min(n_panels);
            // After the last group of panels comes the next task's first
            // (the pool runs a thread's tasks in order).
            let next_q = ((t + 1) % panel_chunks) * per_chunk;
            // SAFETY: task `t` alone writes its (pixel block × panel
            // chunk) region, inside `y` (the assert in `run` bounds the
            // pixels; `y_first` is 0).
            unsafe { self.gemm_span::<M, P>(&io, (block(bi), block(bi + 1)), (q0, q1), next_q) };
        };
        pool.run(n_pb * panel_chunks, &task);
    }

    /// Output pixels `p0..p1`, panels `q0..q1` of the gemm algorithm on
    /// the calling thread (one task of [`Conv2dNhwc::run_gemm`], or a band
    /// of rows of a fused expansion); `next_q` is the first panel the
    /// caller computes next (its weights are prefetched at the end).
    ///
    /// # Safety
    /// For every pixel `p` in `p0..p1`, the output channels of panels
    /// `q0..q1` at `io.y + (p − io.y_first)·c_out` are valid for writes,
    /// and no other thread touches them meanwhile.
    pub(super) unsafe fn gemm_span<const M: usize, const P: usize>(
        &self,
        io: &GemmIo<'_>,
        (p0, p1): (usize, usize),
        (q0, q1): (usize, usize),
        next_q: usize,
    ) {
        let g = &self.g;
        let (cin, cout) = (g.c_in, g.c_out);
        let taps = g.kh * g.kw;
        let k = io.k;
        let n_panels = cout.div_ceil(NR);
        let isa = io.isa;
        let clamp = crate::gemm::in_register_clamp(self.act);
        let pointwise = taps == 1 && g.stride == [1, 1] && g.pads == [0; 4];
        assert!(
            p0 >= io.y_first && p1 <= self.oh * self.ow && io.panels.len() >= n_panels * k * NR
        );
        let zeros = self.zeros.as_ptr();
        let mut rows = [[zeros; M]; MAX_TAPS];
        // Points `rows` at the A rows of pixels p..p+n_rows; returns the
        // taps the tile reads, and the distance in floats between
        // consecutive rows when every tap's rows are that far apart
        // inside the input and the tile is full (0 otherwise).
        let setup = |p: usize, n_rows: usize, rows: &mut [[*const f32; M]; MAX_TAPS]| {
            if pointwise {
                for (r, slot) in rows[0].iter_mut().enumerate() {
                    *slot = if r < n_rows {
                        io.x[(p + r) * cin..(p + r + 1) * cin].as_ptr()
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
                                    io.x[px * cin..(px + (n_rows - 1) * sx + 1) * cin].as_ptr();
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
                            Some(px) => io.x[px * cin..(px + 1) * cin].as_ptr(),
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
                w: &io.panels[q * k * NR..(q + P).min(n_panels) * k * NR],
                panel_len: k * NR,
                bias: &self.bias[c0..c0 + P * NR],
                res: io.res.map(|r| &r[p * cout + c0..]),
                ldc: cout,
                n_rows,
                cols,
                clamp,
                prefetch,
                step,
            };
            // SAFETY: pixels p..p+n_rows (inside p0..p1) of channels
            // c0..c0+cols (inside panels q0..q1) are the caller's to
            // write (the function's contract).
            let dst = unsafe { io.y.add((p - io.y_first) * cout + c0) };
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
                    let from = ((p + M) * cin).min(io.x.len());
                    Prefetch::L1(&io.x[from..((p + 2 * M) * cin).min(io.x.len())])
                } else {
                    Prefetch::None
                };
                // A store-bound layer (few input channels, an output
                // bigger than the caches) also claims the next tile's
                // output lines for writing.
                if io.write_ahead {
                    let (c0, c1) = (q0 * NR, (q1 * NR).min(cout));
                    for pp in p + M..(p + 2 * M).min(p1) {
                        // SAFETY: pixel pp < p1: the caller's region.
                        let row = unsafe { io.y.add((pp - io.y_first) * cout + c0) };
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
            for q in (q0..q1).step_by(P) {
                let nq = if q + P < q1 { q + P } else { next_q };
                let nq_end = if q + P < q1 { q1 } else { n_panels };
                let next = &io.panels[nq * k * NR..(nq + P).min(nq_end) * k * NR];
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
                // SAFETY: pixels p0..p1, every channel, are the caller's
                // (the function's contract).
                let block = unsafe {
                    std::slice::from_raw_parts_mut(
                        io.y.add((p0 - io.y_first) * cout),
                        (p1 - p0) * cout,
                    )
                };
                self.act.apply_slice(block);
            } else {
                for p in p0..p1 {
                    // SAFETY: channels c0..c1 of pixel p are the
                    // caller's (the function's contract).
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(
                            io.y.add((p - io.y_first) * cout + c0),
                            c1 - c0,
                        )
                    };
                    self.act.apply_slice(row);
                }
            }
        }
    }
}

/// What [`Conv2dNhwc::gemm_span`] reads and where it writes.
pub(super) struct GemmIo<'a> {
    pub isa: Isa,
    /// The layer's input (one image, NHWC).
    pub x: &'a [f32],
    /// The residual (the output's shape), if fused.
    pub res: Option<&'a [f32]>,
    /// Output pixel `p` goes to `y + (p − y_first)·c_out`: the whole
    /// output (`y_first` 0), or a band of rows in a ring buffer.
    pub y: SyncPtr<f32>,
    pub y_first: usize,
    /// The packed weights and the reduction length.
    pub panels: &'a [f32],
    pub k: usize,
    /// Claim the next tile's output lines for writing (store-bound layers
    /// with outputs bigger than the caches).
    pub write_ahead: bool,
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
