//! f32 GEMM: `C[m, n] = epilogue(A[m, k] · B[k, n] (+ C))`.
//!
//! A is the constant operand (weights): it is packed once, at engine load, into
//! panels of [`MR`] rows stored k-major. B is packed on the fly, per thread, into
//! panels of [`NR`] columns. The micro-kernel computes one MR×NR tile in
//! registers; the AVX2+FMA variant is `avx2_fma_sgemm_6x16`, the portable one
//! (compiled to NEON on aarch64) `portable_sgemm_6x16`.
//!
//! Work is split into (row block × column block) tasks on the thread pool; the
//! per-thread B buffers come from caller-provided scratch, so a call allocates
//! nothing.

use crate::activation::Activation;
use crate::isa::{self, Isa};
use crate::pool::{SyncPtr, ThreadPool};

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile.
pub const NR: usize = 16;
/// Depth of one packed block (k).
const KC: usize = 256;
/// Rows per cache block (a multiple of MR).
const MC: usize = 120;
/// Widest column block any blocking may pack (sizes the scratch).
const NC_LIMIT: usize = 512;

/// Cache blocking of one GEMM: the widest column block a task handles, and
/// whether B is packed. Several are offered as tactics; the builder times
/// them per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Blocking {
    /// Columns per B block (a multiple of [`NR`], at most 512).
    pub nc: usize,
    /// Copy B into panels first (`true`), or let the micro-kernel read a
    /// row-major B in place (`false`; only for explicit, unit-stride B:
    /// saves a pass over memory-bound layers with a small K).
    pub pack_b: bool,
}

impl Blocking {
    /// The default when nothing was tuned.
    pub const DEFAULT: Blocking = Blocking {
        nc: 256,
        pack_b: true,
    };
    /// The candidates a tuner should time.
    pub const CANDIDATES: [Blocking; 6] = [
        Blocking {
            nc: 128,
            pack_b: true,
        },
        Blocking {
            nc: 256,
            pack_b: true,
        },
        Blocking {
            nc: 512,
            pack_b: true,
        },
        Blocking {
            nc: 128,
            pack_b: false,
        },
        Blocking {
            nc: 256,
            pack_b: false,
        },
        Blocking {
            nc: 512,
            pack_b: false,
        },
    ];

    fn panels(self) -> usize {
        (self.nc.clamp(NR, NC_LIMIT) / NR).max(1)
    }
}

impl Default for Blocking {
    fn default() -> Self {
        Blocking::DEFAULT
    }
}

/// Weights packed into MR-row panels, k-major inside each panel:
/// element (i, k) lives at `data[(i / MR) * k_total * MR + k * MR + i % MR]`.
/// Rows past `m` are zero.
#[derive(Clone, Debug)]
pub struct PackedA {
    data: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedA {
    /// Packs the m×k matrix whose element (i, j) is `a[i * rs + j * cs]`.
    ///
    /// # Panics
    /// If `a` is too short for the given shape and strides (callers derive the
    /// strides from shapes they validated).
    pub fn pack(m: usize, k: usize, a: &[f32], rs: usize, cs: usize) -> PackedA {
        let panels = m.div_ceil(MR);
        let mut data = vec![0.0f32; panels * k * MR];
        for p in 0..panels {
            let base = p * k * MR;
            for r in 0..MR {
                let i = p * MR + r;
                if i >= m {
                    break;
                }
                for j in 0..k {
                    data[base + j * MR + r] = a[i * rs + j * cs];
                }
            }
        }
        PackedA { data, m, k }
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Depth.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// A read-only view of B: element (k, n) is `data[k * rs + n * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// Backing storage.
    pub data: &'a [f32],
    /// Row (k) stride.
    pub rs: usize,
    /// Column (n) stride.
    pub cs: usize,
}

/// An implicit im2col view of one group of a convolution input, used as B:
/// row `k = (ci·kh + ky)·kw + kx`, column `n = oy·ow + ox`, value
/// `x[ci, oy·sy + ky·dy − pt, ox·sx + kx·dx − pl]` or 0 in the padding.
#[derive(Clone, Copy, Debug)]
pub struct Im2colRef<'a> {
    /// The group's input planes `[cin, h, w]`.
    pub data: &'a [f32],
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel (kh, kw).
    pub kernel: [usize; 2],
    /// Strides (y, x).
    pub stride: [usize; 2],
    /// Dilations (y, x).
    pub dilation: [usize; 2],
    /// Pads top and left (bottom/right follow from the output size).
    pub pad_tl: [usize; 2],
    /// Output width (columns wrap every `ow`).
    pub ow: usize,
}

/// The B operand: an explicit matrix or an implicit im2col view.
#[derive(Clone, Copy, Debug)]
pub enum BSource<'a> {
    /// Element (k, n) of a strided matrix.
    Mat(MatRef<'a>),
    /// Convolution input unfolded on the fly while packing.
    Im2col(Im2colRef<'a>),
}

impl<'a> From<MatRef<'a>> for BSource<'a> {
    fn from(m: MatRef<'a>) -> Self {
        BSource::Mat(m)
    }
}

/// What happens to each output element after the product.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// Per-row bias (length m), added first.
    pub bias: Option<&'a [f32]>,
    /// Activation, applied last.
    pub act: Activation,
    /// Add the previous contents of C (beta = 1) before bias and activation.
    pub accumulate: bool,
    /// Added before the activation, laid out like C (row stride `ldc`): the
    /// residual of a fused `Conv + Add`.
    pub residual: Option<&'a [f32]>,
}

impl Epilogue<'_> {
    /// Plain product, C overwritten.
    pub const NONE: Epilogue<'static> = Epilogue {
        bias: None,
        act: Activation::None,
        accumulate: false,
        residual: None,
    };
}

/// Scratch elements [`sgemm`] needs for a pool of `threads` threads.
pub fn scratch_len(threads: usize) -> usize {
    threads.max(1) * KC * NC_LIMIT
}

/// `C = epilogue(A·B)` for an m×n C with row stride `ldc`, default blocking.
///
/// # Panics
/// If `c` or `scratch` is too short; shapes are validated when the engine is built.
pub fn sgemm<'b>(
    pool: &ThreadPool,
    a: &PackedA,
    b: impl Into<BSource<'b>>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    scratch: &mut [f32],
) {
    sgemm_blocked(pool, a, b, n, c, ldc, epi, scratch, Blocking::DEFAULT)
}

/// As [`sgemm`], with explicit cache blocking (a tactic).
///
/// # Panics
/// If `c` or `scratch` is too short.
pub fn sgemm_blocked<'b>(
    pool: &ThreadPool,
    a: &PackedA,
    b: impl Into<BSource<'b>>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    scratch: &mut [f32],
    blocking: Blocking,
) {
    let m = a.m;
    let k = a.k;
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: C too small");
    if let Some(r) = epi.residual {
        assert!(r.len() >= (m - 1) * ldc + n, "gemm: residual too small");
    }
    assert!(
        scratch.len() >= scratch_len(pool.threads()),
        "gemm: scratch too small"
    );
    let b: BSource<'b> = b.into();
    match b {
        BSource::Mat(bm) if k > 0 => {
            let last_b = (k - 1) * bm.rs + (n - 1) * bm.cs;
            assert!(bm.data.len() > last_b, "gemm: B too small");
        }
        BSource::Im2col(v) => {
            let cin = k / (v.kernel[0] * v.kernel[1]).max(1);
            assert!(
                v.data.len() >= cin * v.h * v.w,
                "gemm: im2col input too small"
            );
            assert!(v.ow > 0, "gemm: im2col output width 0");
        }
        _ => {}
    }
    let isa = isa::active();
    let threads = pool.threads();

    // Column blocks first (each packs its own B); split rows too when there
    // are not enough columns to keep every thread busy.
    let n_panels = n.div_ceil(NR);
    let want_tasks = if threads > 1 { threads * 3 } else { 1 };
    let nb_panels = n_panels.div_ceil(want_tasks).clamp(1, blocking.panels());
    let n_blocks = n_panels.div_ceil(nb_panels);
    let m_panels = m.div_ceil(MR);
    let m_blocks = if n_blocks >= want_tasks {
        1
    } else {
        want_tasks.div_ceil(n_blocks).min(m_panels)
    };
    let mb_panels = m_panels.div_ceil(m_blocks);
    let m_blocks = m_panels.div_ceil(mb_panels);

    let c_ptr = SyncPtr::new(c);
    let s_ptr = SyncPtr::new(scratch);
    let task = |t: usize, slot: usize| {
        let (mbi, nbi) = (t / n_blocks, t % n_blocks);
        let n0 = nbi * nb_panels * NR;
        let n1 = (n0 + nb_panels * NR).min(n);
        let p0 = mbi * mb_panels;
        let p1 = (p0 + mb_panels).min(m_panels);
        // SAFETY: each thread slot owns a disjoint KC*NC_LIMIT window of
        // scratch, and tasks write disjoint (row block × column block)
        // regions of C; the asserts above bound every index used below.
        unsafe {
            let pack =
                std::slice::from_raw_parts_mut(s_ptr.add(slot * KC * NC_LIMIT), KC * NC_LIMIT);
            gemm_block(
                isa,
                a,
                b,
                n0,
                n1,
                p0,
                p1,
                c_ptr,
                ldc,
                &epi,
                pack,
                !blocking.pack_b,
            );
        }
    };
    pool.run(m_blocks * n_blocks, &task);
}

/// Computes rows of panels `p0..p1` and columns `n0..n1`.
///
/// # Safety
/// `c` must be valid for the region, and no other thread may touch it.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    isa: Isa,
    a: &PackedA,
    b: BSource<'_>,
    n0: usize,
    n1: usize,
    p0: usize,
    p1: usize,
    c: SyncPtr<f32>,
    ldc: usize,
    epi: &Epilogue<'_>,
    pack: &mut [f32],
    direct_ok: bool,
) {
    let k = a.k;
    let m = a.m;
    let width = n1 - n0;
    let panels = width.div_ceil(NR);
    if k == 0 {
        // Degenerate product: C = epilogue(0).
        for i in p0 * MR..(p1 * MR).min(m) {
            for j in n0..n1 {
                let bias = epi.bias.map_or(0.0, |bb| bb[i]);
                // SAFETY: (i, j) is inside this task's region of C.
                unsafe {
                    let cp = c.add(i * ldc + j);
                    let prev = if epi.accumulate { *cp } else { 0.0 };
                    let res = epi.residual.map_or(0.0, |r| r[i * ldc + j]);
                    *cp = epi.act.apply(prev + bias + res);
                }
            }
        }
        return;
    }
    let mut k0 = 0;
    while k0 < k {
        let kc = (k - k0).min(KC);
        // Direct B: full panels are read in place; only a partial last
        // panel is packed (into the first panel slot).
        let direct = match b {
            BSource::Mat(bm) if direct_ok && bm.cs == 1 => Some(bm),
            _ => None,
        };
        match (b, direct) {
            (_, Some(bm)) => {
                let last_j = n0 + (panels - 1) * NR;
                if n1 - last_j < NR {
                    pack_b(bm, k0, kc, last_j, n1, pack);
                }
            }
            (BSource::Mat(bm), None) => pack_b(bm, k0, kc, n0, n1, pack),
            (BSource::Im2col(v), None) => pack_b_im2col(&v, k0, kc, n0, n1, pack),
        }
        let first = k0 == 0;
        let last = k0 + kc == k;
        let load_c = !first || epi.accumulate;
        let clamp = if last {
            in_register_clamp(epi.act)
        } else {
            None
        };
        let mut pc = p0;
        while pc < p1 {
            let pc_end = (pc + MC / MR).min(p1);
            let mut jp = 0;
            while jp < panels {
                let j = n0 + jp * NR;
                let nr = (n1 - j).min(NR);
                let (bp, ldb): (&[f32], usize) = match direct {
                    Some(bm) if nr == NR => (&bm.data[k0 * bm.rs + j..], bm.rs),
                    Some(_) => (&pack[..kc * NR], NR),
                    None => (&pack[jp * kc * NR..(jp + 1) * kc * NR], NR),
                };
                // AVX-512: two full panels per tile (6 rows × 32 columns).
                let pair = isa.has_avx512() && n1 - j >= 2 * NR;
                let bp2: &[f32] = match direct {
                    _ if !pair => &[],
                    Some(bm) => &bm.data[k0 * bm.rs + j + NR..],
                    None => &pack[(jp + 1) * kc * NR..(jp + 2) * kc * NR],
                };
                for p in pc..pc_end {
                    let i = p * MR;
                    let mr = (m - i).min(MR);
                    let ap = &a.data[p * k * MR + k0 * MR..p * k * MR + (k0 + kc) * MR];
                    let mut bias = [0.0f32; MR];
                    if first {
                        if let Some(bb) = epi.bias {
                            bias[..mr].copy_from_slice(&bb[i..i + mr]);
                        }
                    }
                    let res = match epi.residual {
                        // SAFETY: (i, j) is inside C's extent, which the
                        // residual matches (asserted in `sgemm`).
                        Some(r) if first => unsafe { r.as_ptr().add(i * ldc + j) },
                        _ => std::ptr::null(),
                    };
                    let store = Store {
                        load_c,
                        bias,
                        clamp,
                        res,
                        ldr: ldc,
                    };
                    let width = if pair { 2 * NR } else { nr };
                    // SAFETY: the tile (i..i+mr, j..j+width) is inside C's
                    // region; a pair's second panel holds kc rows of NR
                    // floats at stride ldb like the first.
                    unsafe {
                        if pair {
                            let c0 = c.add(i * ldc + j);
                            tile_pair(isa, kc, ap, bp, bp2, ldb, c0, ldc, mr, &store);
                        } else {
                            tile(
                                isa,
                                kc,
                                ap,
                                bp,
                                ldb,
                                c.add(i * ldc + j),
                                ldc,
                                mr,
                                nr,
                                &store,
                            );
                        }
                        if last && clamp.is_none() {
                            apply_activation(c.add(i * ldc + j), ldc, mr, width, epi.act);
                        }
                    }
                }
                jp += if pair { 2 } else { 1 };
            }
            pc = pc_end;
        }
        k0 += kc;
    }
}

/// Packs B rows `k0..k0+kc`, columns `n0..n1` into NR-wide panels, zero-padded.
fn pack_b(b: MatRef<'_>, k0: usize, kc: usize, n0: usize, n1: usize, out: &mut [f32]) {
    let width = n1 - n0;
    let panels = width.div_ceil(NR);
    for jp in 0..panels {
        let j = n0 + jp * NR;
        let nr = (n1 - j).min(NR);
        let dst = &mut out[jp * kc * NR..(jp + 1) * kc * NR];
        for kk in 0..kc {
            let row = &mut dst[kk * NR..kk * NR + NR];
            let src0 = (k0 + kk) * b.rs + j * b.cs;
            if b.cs == 1 {
                row[..nr].copy_from_slice(&b.data[src0..src0 + nr]);
            } else {
                for (x, r) in row[..nr].iter_mut().enumerate() {
                    *r = b.data[src0 + x * b.cs];
                }
            }
            row[nr..].iter_mut().for_each(|v| *v = 0.0);
        }
    }
}

/// One MR×NR tile (or a partial one through a stack buffer).
///
/// # Safety
/// `c` must be valid for `mr` rows of `nr` elements with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile(
    isa: Isa,
    kc: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    store: &Store,
) {
    if mr == MR && nr == NR {
        // SAFETY: full tile, forwarded contract.
        unsafe { ukernel(isa, kc, a, b, ldb, c, ldc, store) };
        return;
    }
    let mut buf = [0.0f32; MR * NR];
    if store.load_c {
        for r in 0..mr {
            for x in 0..nr {
                // SAFETY: (r, x) inside the valid part of the tile.
                buf[r * NR + x] = unsafe { *c.add(r * ldc + x) };
            }
        }
    }
    // Stage the residual too, so the kernel reads a full tile.
    let mut rbuf = [0.0f32; MR * NR];
    let mut staged = *store;
    if !store.res.is_null() {
        for r in 0..mr {
            for x in 0..nr {
                // SAFETY: (r, x) inside the valid part of the residual tile.
                rbuf[r * NR + x] = unsafe { *store.res.add(r * store.ldr + x) };
            }
        }
        staged.res = rbuf.as_ptr();
        staged.ldr = NR;
    }
    // SAFETY: `buf` is a full MR×NR tile with row stride NR.
    unsafe { ukernel(isa, kc, a, b, ldb, buf.as_mut_ptr(), NR, &staged) };
    for r in 0..mr {
        for x in 0..nr {
            // SAFETY: as above.
            unsafe { *c.add(r * ldc + x) = buf[r * NR + x] };
        }
    }
}

/// # Safety
/// `c` valid for a full MR×NR tile with row stride `ldc`; `a` holds kc·MR
/// elements and `b` kc rows of NR elements at stride `ldb`.
#[inline(always)]
unsafe fn ukernel(
    isa: Isa,
    kc: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    store: &Store,
) {
    debug_assert!(a.len() >= kc * MR && b.len() >= (kc - 1) * ldb + NR);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX2 tiers are only active when the CPU has AVX2 and FMA.
        Isa::Avx2Fma | Isa::Avx512 => unsafe {
            avx2_fma_sgemm_6x16(kc, a.as_ptr(), b.as_ptr(), ldb, c, ldc, store)
        },
        // SAFETY: forwarded contract.
        _ => unsafe { portable_sgemm_6x16(kc, a, b, ldb, c, ldc, store) },
    }
}

/// An `mr` × 2·NR tile from two full B panels: the AVX-512 6 × 32
/// micro-kernel when the rows are whole, else the two halves as two tiles.
///
/// # Safety
/// As [`tile`], for both panels and the 2·NR-wide tile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_pair(
    isa: Isa,
    kc: usize,
    a: &[f32],
    b0: &[f32],
    b1: &[f32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    store: &Store,
) {
    debug_assert!(a.len() >= kc * MR && b1.len() >= (kc - 1) * ldb + NR);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && mr == MR {
        // SAFETY: the AVX-512 tier is only active when the CPU has
        // AVX-512 F (and AVX2, FMA); forwarded contract.
        unsafe { avx512_sgemm_6x32(kc, a.as_ptr(), b0.as_ptr(), b1.as_ptr(), ldb, c, ldc, store) };
        return;
    }
    let mut second = *store;
    if !store.res.is_null() {
        // SAFETY: the residual tile is as wide as C's (forwarded contract).
        second.res = unsafe { store.res.add(NR) };
    }
    // SAFETY: forwarded contract, one panel at a time.
    unsafe {
        tile(isa, kc, a, b0, ldb, c, ldc, mr, NR, store);
        tile(isa, kc, a, b1, ldb, c.add(NR), ldc, mr, NR, &second);
    }
}

/// How a micro-kernel writes its tile:
/// `C = clamp(acc + (C) + bias[row] + (R))`.
#[derive(Clone, Copy, Debug)]
struct Store {
    load_c: bool,
    bias: [f32; MR],
    clamp: Option<(f32, f32)>,
    /// Residual tile (null for none) and its row stride.
    res: *const f32,
    ldr: usize,
}

/// Activations the micro-kernels apply in registers (a clamp).
pub(crate) fn in_register_clamp(act: Activation) -> Option<(f32, f32)> {
    match act {
        Activation::None => Some((f32::NEG_INFINITY, f32::INFINITY)),
        Activation::Relu => Some((0.0, f32::INFINITY)),
        Activation::Clip { lo, hi } => Some((lo, hi)),
        _ => None,
    }
}

/// Portable micro-kernel (LLVM vectorises it to NEON on aarch64).
///
/// # Safety
/// As [`ukernel`].
#[inline(always)]
unsafe fn portable_sgemm_6x16(
    kc: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    store: &Store,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for (kk, ak) in a.chunks_exact(MR).take(kc).enumerate() {
        let bk = &b[kk * ldb..kk * ldb + NR];
        for r in 0..MR {
            let av = ak[r];
            for x in 0..NR {
                acc[r][x] += av * bk[x];
            }
        }
    }
    let (lo, hi) = store.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    for (r, row) in acc.iter().enumerate() {
        for (x, v) in row.iter().enumerate() {
            // SAFETY: full tile, forwarded contract.
            unsafe {
                let p = c.add(r * ldc + x);
                let prev = if store.load_c { *p } else { 0.0 };
                let res = if store.res.is_null() {
                    0.0
                } else {
                    *store.res.add(r * store.ldr + x)
                };
                *p = (v + prev + store.bias[r] + res).max(lo).min(hi);
            }
        }
    }
}

/// AVX2+FMA micro-kernel: 12 ymm accumulators, B in 2 ymm, A broadcast.
///
/// # Safety
/// CPU must support AVX2 and FMA; pointers as [`ukernel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma_sgemm_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    store: &Store,
) {
    use std::arch::x86_64::*;
    // SAFETY: every pointer offset stays inside the kc·MR A panel, the kc
    // rows of NR floats at stride ldb of B, and the MR×NR tile, as
    // guaranteed by the caller.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(kk * ldb));
            let b1 = _mm256_loadu_ps(b.add(kk * ldb + 8));
            let ap = a.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        let (lo, hi) = store.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (vlo, vhi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        for (r, row) in acc.iter().enumerate() {
            let cp = c.add(r * ldc);
            let bias = _mm256_set1_ps(store.bias[r]);
            let (mut v0, mut v1) = (_mm256_add_ps(row[0], bias), _mm256_add_ps(row[1], bias));
            if store.load_c {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cp));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cp.add(8)));
            }
            if !store.res.is_null() {
                let rp = store.res.add(r * store.ldr);
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(rp));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(rp.add(8)));
            }
            // max/min with the clamp bounds, NaN-propagating like f32::max/min would not
            // matter here: inputs are finite.
            v0 = _mm256_min_ps(_mm256_max_ps(v0, vlo), vhi);
            v1 = _mm256_min_ps(_mm256_max_ps(v1, vlo), vhi);
            _mm256_storeu_ps(cp, v0);
            _mm256_storeu_ps(cp.add(8), v1);
        }
    }
}

/// AVX-512 micro-kernel: 6 rows × 32 columns (two B panels) in 12 zmm
/// accumulators, A broadcast.
///
/// # Safety
/// CPU must support AVX-512 F; pointers as [`tile_pair`] with whole rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx512_sgemm_6x32(
    kc: usize,
    a: *const f32,
    b0: *const f32,
    b1: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    store: &Store,
) {
    use std::arch::x86_64::*;
    // SAFETY: every pointer offset stays inside the kc·MR A panel, the kc
    // rows of NR floats at stride ldb of each B panel, and the MR×2·NR
    // tile, as guaranteed by the caller.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for kk in 0..kc {
            let v0 = _mm512_loadu_ps(b0.add(kk * ldb));
            let v1 = _mm512_loadu_ps(b1.add(kk * ldb));
            let ap = a.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r));
                row[0] = _mm512_fmadd_ps(av, v0, row[0]);
                row[1] = _mm512_fmadd_ps(av, v1, row[1]);
            }
        }
        let (lo, hi) = store.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        for r in 0..MR {
            let cp = c.add(r * ldc);
            let bias = _mm512_set1_ps(store.bias[r]);
            let mut v = [
                _mm512_add_ps(acc[r][0], bias),
                _mm512_add_ps(acc[r][1], bias),
            ];
            for (h, vh) in v.iter_mut().enumerate() {
                if store.load_c {
                    *vh = _mm512_add_ps(*vh, _mm512_loadu_ps(cp.add(h * NR)));
                }
                if !store.res.is_null() {
                    let rp = store.res.add(r * store.ldr + h * NR);
                    *vh = _mm512_add_ps(*vh, _mm512_loadu_ps(rp));
                }
                *vh = _mm512_min_ps(_mm512_max_ps(*vh, vlo), vhi);
                _mm512_storeu_ps(cp.add(h * NR), *vh);
            }
        }
    }
}

/// Applies an activation the micro-kernel could not apply in registers.
///
/// # Safety
/// `c` valid for the mr×nr tile.
#[inline(always)]
unsafe fn apply_activation(c: *mut f32, ldc: usize, mr: usize, nr: usize, act: Activation) {
    for r in 0..mr {
        // SAFETY: row r of the tile, nr elements.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), nr) };
        act.apply_slice(row);
    }
}

/// Packs rows `k0..k0+kc`, columns `n0..n1` of an implicit im2col matrix.
///
/// Coordinates are tracked incrementally (no divisions per element); a panel
/// that lies in one output row and reads an in-bounds input segment is a
/// plain (strided) copy.
fn pack_b_im2col(v: &Im2colRef<'_>, k0: usize, kc: usize, n0: usize, n1: usize, out: &mut [f32]) {
    let width = n1 - n0;
    let panels = width.div_ceil(NR);
    let [kh, kw] = v.kernel;
    let [sy, sx] = v.stride;
    let [dy, dx] = v.dilation;
    let (pt, pl) = (v.pad_tl[0] as isize, v.pad_tl[1] as isize);
    let (h, w) = (v.h as isize, v.w as isize);
    let plane_len = v.h * v.w;
    // (ci, ky, kx) of row k0.
    let (ci0, ky0, kx0) = (k0 / (kh * kw), (k0 / kw) % kh, k0 % kw);
    let (mut oy0, mut ox0) = (n0 / v.ow, n0 % v.ow);
    for jp in 0..panels {
        let j = n0 + jp * NR;
        let nr = (n1 - j).min(NR);
        let one_row = ox0 + nr <= v.ow;
        let panel = &mut out[jp * kc * NR..(jp + 1) * kc * NR];
        let (mut ci, mut ky, mut kx) = (ci0, ky0, kx0);
        for row in panel.chunks_exact_mut(NR).take(kc) {
            let plane = &v.data[ci * plane_len..(ci + 1) * plane_len];
            let iy = (oy0 * sy + ky * dy) as isize - pt;
            let ix0 = (ox0 * sx + kx * dx) as isize - pl;
            let ix_last = ix0 + ((nr - 1) * sx) as isize;
            if one_row && (iy < 0 || iy >= h) {
                row.iter_mut().for_each(|e| *e = 0.0);
            } else if one_row && ix0 >= 0 && ix_last < w {
                let src = &plane[(iy * w + ix0) as usize..];
                if sx == 1 {
                    row[..nr].copy_from_slice(&src[..nr]);
                } else {
                    for (x, r) in row[..nr].iter_mut().enumerate() {
                        *r = src[x * sx];
                    }
                }
                row[nr..].iter_mut().for_each(|e| *e = 0.0);
            } else {
                let (mut oy, mut ox) = (oy0, ox0);
                for r in row[..nr].iter_mut() {
                    let iy = (oy * sy + ky * dy) as isize - pt;
                    let ix = (ox * sx + kx * dx) as isize - pl;
                    *r = if iy >= 0 && ix >= 0 && iy < h && ix < w {
                        plane[(iy * w + ix) as usize]
                    } else {
                        0.0
                    };
                    ox += 1;
                    if ox == v.ow {
                        ox = 0;
                        oy += 1;
                    }
                }
                row[nr..].iter_mut().for_each(|e| *e = 0.0);
            }
            kx += 1;
            if kx == kw {
                kx = 0;
                ky += 1;
                if ky == kh {
                    ky = 0;
                    ci += 1;
                }
            }
        }
        ox0 += nr;
        while ox0 >= v.ow {
            ox0 -= v.ow;
            oy0 += 1;
        }
    }
}

/// Matrix-vector product `y[i] = Σ_k w[i·k_len + k]·x[k] + bias[i]` for a
/// row-major `[n, k_len]` matrix: the one-row case of a fully connected
/// layer, which the 6×16 GEMM tile would run at 1/16 of its width. Rows are
/// split across the pool; each is one [`crate::quant::dot_f32`].
///
/// # Panics
/// If a buffer is shorter than the shape needs (validated when prepared).
pub fn gemv(
    pool: &ThreadPool,
    w: &[f32],
    k_len: usize,
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let n = y.len();
    assert!(w.len() >= n * k_len && x.len() >= k_len && bias.is_none_or(|b| b.len() >= n));
    let chunk = n
        .div_ceil(pool.threads() * 4)
        .next_multiple_of(GEMV_ROWS)
        .max(1);
    let y_ptr = SyncPtr::new(y);
    #[cfg(target_arch = "x86_64")]
    let avx512 = isa::active().has_avx512();
    let task = |t: usize, _slot: usize| {
        let r0 = t * chunk;
        let r1 = (r0 + chunk).min(n);
        #[cfg(not(target_arch = "x86_64"))]
        let i = r0;
        #[cfg(target_arch = "x86_64")]
        let mut i = r0;
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            while i + GEMV_ROWS <= r1 {
                let mut d = [0.0; GEMV_ROWS];
                // SAFETY: AVX-512 F present; rows i..i+GEMV_ROWS of `w`
                // (k_len floats each) and `x[..k_len]` are in bounds by
                // the assert above (i + GEMV_ROWS ≤ n); the prefetches
                // stay inside `w`.
                unsafe { gemv_rows_avx512(&w[i * k_len..], k_len, &w[..n * k_len], x, &mut d) };
                for (r, v) in d.iter().enumerate() {
                    // SAFETY: row i + r < r1 ≤ n is this task's alone.
                    unsafe { *y_ptr.add(i + r) = v + bias.map_or(0.0, |b| b[i + r]) };
                }
                i += GEMV_ROWS;
            }
        }
        for i in i..r1 {
            let d = crate::quant::dot_f32(&w[i * k_len..(i + 1) * k_len], &x[..k_len]);
            // SAFETY: row i is written by this task alone; i < n = y.len().
            unsafe { *y_ptr.add(i) = d + bias.map_or(0.0, |b| b[i]) };
        }
    };
    pool.run(n.div_ceil(chunk), &task);
}

/// Rows [`gemv`] computes together: `x` is loaded once for all of them.
const GEMV_ROWS: usize = 4;

/// `d[r] = w_r · x` for the [`GEMV_ROWS`] rows at the start of `rows`
/// (`k` floats each). The weights stream from memory once (a classifier's
/// megabytes), so while it reads these rows it prefetches the same columns
/// of the next group of rows (inside `all`, the whole matrix): one line per
/// line read, far enough ahead to hide the memory latency.
///
/// # Safety
/// AVX-512 F available; `rows` holds `GEMV_ROWS · k` floats, `x` `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemv_rows_avx512(
    rows: &[f32],
    k: usize,
    all: &[f32],
    x: &[f32],
    d: &mut [f32; GEMV_ROWS],
) {
    use std::arch::x86_64::*;
    assert!(rows.len() >= GEMV_ROWS * k && x.len() >= k);
    let w = rows.as_ptr();
    // Prefetch target of row r at column j: `ahead + r·k + j`, while it
    // lies inside the matrix.
    let ahead_off = GEMV_ROWS * k;
    let room = (all.as_ptr_range().end as usize).saturating_sub(w as usize) / 4;
    let mut acc = [_mm512_setzero_ps(); GEMV_ROWS];
    let mut j = 0;
    // SAFETY: loads are at columns j..j+16 ≤ k of rows < GEMV_ROWS (checked
    // above), the tail masked to the columns left; prefetch addresses are
    // below `room` floats from `w`, inside `all`.
    unsafe {
        while j < k {
            let mask: __mmask16 = if k - j >= 16 {
                0xffff
            } else {
                ((1u32 << (k - j)) - 1) as __mmask16
            };
            let xv = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(j));
            for (r, a) in acc.iter_mut().enumerate() {
                let off = r * k + j;
                if ahead_off + off < room {
                    _mm_prefetch::<_MM_HINT_T0>(w.add(ahead_off + off).cast());
                }
                let wv = _mm512_maskz_loadu_ps(mask, w.add(off));
                *a = _mm512_fmadd_ps(wv, xv, *a);
            }
            j += 16;
        }
        for (r, a) in acc.iter().enumerate() {
            d[r] = _mm512_reduce_add_ps(*a);
        }
    }
}

/// Scalar reference: `C[i, j] = act(Σ_k A(i,k)·B(k,j) + bias[i] (+ C))`, accumulated in f64.
#[allow(clippy::too_many_arguments)]
pub fn reference_sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for kk in 0..k {
                s += a[i * rsa + kk * csa] as f64 * b.data[kk * b.rs + j * b.cs] as f64;
            }
            let prev = if epi.accumulate { c[i * ldc + j] } else { 0.0 };
            let res = epi.residual.map_or(0.0, |r| r[i * ldc + j]);
            let v = s as f32 + prev + epi.bias.map_or(0.0, |bb| bb[i]) + res;
            c[i * ldc + j] = epi.act.apply(v);
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn gemv_matches_the_reference() {
        for (n, k) in [(1000usize, 1280usize), (7, 33), (3, 5), (1, 64)] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..k)
                .map(|i| ((i * 104729) % 997) as f32 / 498.0 - 1.0)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            for threads in [1, 3] {
                let mut y = vec![0.0; n];
                gemv(&ThreadPool::new(threads), &w, k, &x, Some(&b), &mut y);
                for i in 0..n {
                    let want: f64 = (0..k)
                        .map(|j| w[i * k + j] as f64 * x[j] as f64)
                        .sum::<f64>()
                        + b[i] as f64;
                    assert!(
                        (y[i] as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "{n}x{k} row {i}: {} vs {want}",
                        y[i]
                    );
                }
            }
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn check(m: usize, n: usize, k: usize, threads: usize, trans_b: bool, bias: bool, acc: bool) {
        check_with(m, n, k, threads, trans_b, bias, acc, false)
    }

    fn check_with(
        m: usize,
        n: usize,
        k: usize,
        threads: usize,
        trans_b: bool,
        bias: bool,
        acc: bool,
        residual: bool,
    ) {
        let a = data(m * k, 1);
        let bdat = data(k * n, 2);
        let bias_v = data(m, 3);
        let (rs, cs) = if trans_b { (1, k) } else { (n, 1) };
        let b = MatRef {
            data: &bdat,
            rs,
            cs,
        };
        let ldc = n + 3;
        let res_v = data(m * ldc, 5);
        let epi = Epilogue {
            bias: bias.then_some(&bias_v[..]),
            act: Activation::Clip { lo: -3.0, hi: 3.0 },
            accumulate: acc,
            residual: residual.then_some(&res_v[..]),
        };
        let init = data(m * ldc, 4);
        let mut want = init.clone();
        reference_sgemm(m, n, k, &a, k, 1, b, &mut want, ldc, epi);
        let pool = ThreadPool::new(threads);
        let packed = PackedA::pack(m, k, &a, k, 1);
        let mut got = init.clone();
        let mut scratch = vec![0.0; scratch_len(threads)];
        let blocking = Blocking::CANDIDATES[(m + n + k) % Blocking::CANDIDATES.len()];
        sgemm_blocked(
            &pool,
            &packed,
            b,
            n,
            &mut got,
            ldc,
            epi,
            &mut scratch,
            blocking,
        );
        for i in 0..m {
            for j in 0..n {
                let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
                let tol = 1e-4 * (k as f32).sqrt().max(1.0) * (1.0 + w.abs());
                assert!((g - w).abs() <= tol, "m{m} n{n} k{k} ({i},{j}): {g} vs {w}");
            }
            // Padding columns untouched.
            for j in n..ldc {
                assert_eq!(got[i * ldc + j], init[i * ldc + j]);
            }
        }
    }

    #[test]
    fn fixed_shapes() {
        check(1, 1, 1, 1, false, false, false);
        check(6, 16, 8, 1, false, true, false);
        check(13, 37, 300, 2, false, true, true);
        check(64, 3, 600, 3, true, false, false);
        check(7, 520, 5, 2, false, true, false);
        check(3, 5, 0, 1, false, true, false);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_reference(m in 1usize..40, n in 1usize..70, k in 0usize..300,
                             threads in 1usize..4, trans_b: bool, bias: bool, acc: bool, res: bool) {
            check_with(m, n, k, threads, trans_b, bias, acc, res);
        }
    }
}
