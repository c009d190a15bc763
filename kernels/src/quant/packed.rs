//! Row-interleaved copies of Q4_1 and Q8_0 weight matrices for the x86
//! decode products.
//!
//! A GGML matrix stores each row's blocks one after the other, every block
//! with its own f16 scale(s). Multiplying four rows at a time from that
//! layout spends more instructions on scales than on weights: each block of
//! each row needs its scale loaded, widened from f16, multiplied and
//! broadcast, and the nibbles of each row unpacked alone. The packed layout
//! takes eight rows at a time and puts, for each 32-column block, their
//! eight `d` (and `m`) side by side, so one `vcvtph2ps` widens all eight,
//! and pairs two rows' nibbles into one byte, so one 32-byte load, a shift
//! and two masks give both rows' 32 values:
//!
//! | type | one group-block (8 rows × 32 columns) | bytes |
//! |---|---|---|
//! | Q4_1 | `d`×8 f16, `m`×8 f16, 4 row pairs × 32 bytes | 160 (8 × 20) |
//! | Q8_0 | `d`×8 f16, 8 rows × 32 i8 | 272 (8 × 34) |
//!
//! In a Q4_1 row pair, byte `j` (`j < 16`) holds value `j` of the first row
//! in its low nibble and of the second in its high nibble; byte `16 + j`
//! holds value `16 + j` of both. The bytes per weight are unchanged (it is
//! a reordering, not a dequantized copy), and a group's blocks are one
//! contiguous run, so a task streams one linear range instead of eight
//! interleaved rows.
//!
//! The arithmetic is exactly the row-major products' (same `i32` sums per
//! lane, same float operations in the same order per row), so results are
//! bit-identical to them and hence to llama.cpp; the tests check that.

use std::sync::Arc;

use super::{Q8Act, QuantType};

/// Rows per packed group.
pub const GROUP_ROWS: usize = 8;

/// The first `rows` rows (a multiple of [`GROUP_ROWS`]) of a Q4_1 or Q8_0
/// matrix, row-interleaved (see the module documentation). Cheap to
/// clone: the bytes live in a shared mapping.
#[derive(Clone)]
pub struct Packed {
    ty: QuantType,
    rows: usize,
    cols: usize,
    /// An anonymous mapping shared by every matrix packed together, with
    /// transparent huge pages requested: the products stream every byte
    /// once per token, and with 4 KiB pages that is a TLB miss every
    /// 4 KiB (one mapping, because only whole aligned 2 MiB ranges get
    /// huge pages and most matrices are smaller).
    arena: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.len)
            .finish()
    }
}

/// One matrix for [`Packed::pack_all`]: type, row-major weights, rows,
/// columns.
pub type PackSource<'a> = (QuantType, &'a [u8], usize, usize);

/// Bytes of one group-block of `ty` (eight rows × 32 columns).
fn group_block_bytes(ty: QuantType) -> usize {
    GROUP_ROWS * ty.block_bytes()
}

/// Packed bytes of a matrix, or `None` if it cannot be packed: a type
/// other than Q4_1 / Q8_0, `cols` not whole blocks, fewer than eight rows,
/// fewer bytes than the shape needs.
fn packed_len(&(ty, w, rows, cols): &PackSource<'_>) -> Option<usize> {
    if !matches!(ty, QuantType::Q4_1 | QuantType::Q8_0)
        || cols == 0
        || !cols.is_multiple_of(32)
        || rows < GROUP_ROWS
        || w.len() < rows.checked_mul(ty.row_bytes(cols))?
    {
        return None;
    }
    Some(rows / GROUP_ROWS * (cols / 32) * group_block_bytes(ty))
}

/// Writes the packed form of `(ty, w, rows, cols)` (checked by
/// [`packed_len`]) into `dst`, which is zeroed and exactly that long.
fn fill(&(ty, w, _, cols): &PackSource<'_>, dst: &mut [u8]) {
    let (nb, bb, rb) = (cols / 32, ty.block_bytes(), ty.row_bytes(cols));
    for (i, blk) in dst.chunks_exact_mut(group_block_bytes(ty)).enumerate() {
        let (g, k) = (i / nb, i % nb);
        for r in 0..GROUP_ROWS {
            let src = &w[(g * GROUP_ROWS + r) * rb + k * bb..][..bb];
            blk[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
            match ty {
                QuantType::Q4_1 => {
                    blk[16 + 2 * r..18 + 2 * r].copy_from_slice(&src[2..4]);
                    let pair = &mut blk[32 + 32 * (r / 2)..][..32];
                    let shift = 4 * (r % 2);
                    for (j, &q) in src[4..20].iter().enumerate() {
                        pair[j] |= (q & 0x0f) << shift;
                        pair[16 + j] |= (q >> 4) << shift;
                    }
                }
                _ => blk[16 + 32 * r..48 + 32 * r].copy_from_slice(&src[2..34]),
            }
        }
    }
}

impl Packed {
    /// Packs the whole groups of eight rows of `w` (`rows` × `cols`, row
    /// major); see [`Packed::pack_all`] for when the answer is `None`.
    pub fn new(ty: QuantType, w: &[u8], rows: usize, cols: usize) -> Option<Packed> {
        Packed::pack_all(&[(ty, w, rows, cols)]).pop().flatten()
    }

    /// Packs several matrices into one mapping (a model's, so that it can
    /// take huge pages); one answer per matrix, `None` where there is
    /// nothing to gain: a type other than Q4_1 / Q8_0, `cols` not whole
    /// blocks, fewer than eight rows, too few bytes, a CPU without the x86
    /// products that read the layout, or no memory for the mapping.
    pub fn pack_all(mats: &[PackSource<'_>]) -> Vec<Option<Packed>> {
        Packed::pack_all_on(mats, cpu_reads_packed())
    }

    /// [`Packed::pack_all`], packing whatever can be packed if `cpu`
    /// (tests pack on every CPU).
    fn pack_all_on(mats: &[PackSource<'_>], cpu: bool) -> Vec<Option<Packed>> {
        let lens: Vec<Option<usize>> = mats.iter().map(|m| packed_len(m).filter(|_| cpu)).collect();
        // Each matrix on a cache line of its own.
        let mut starts = Vec::with_capacity(mats.len());
        let mut total = 0usize;
        for len in &lens {
            starts.push(total);
            total += len.map_or(0, |l| l.next_multiple_of(64));
        }
        let arena = (total > 0)
            .then(|| memmap2::MmapMut::map_anon(total).ok())
            .flatten()
            .and_then(|mut map| {
                #[cfg(target_os = "linux")]
                {
                    // Asked before the first write, so each first touch of
                    // an aligned 2 MiB range can take a huge page. Only a
                    // request: without transparent huge pages the mapping
                    // keeps 4 KiB pages and works the same.
                    let _ = map.advise(memmap2::Advice::HugePage);
                }
                for ((m, len), &start) in mats.iter().zip(&lens).zip(&starts) {
                    if let Some(len) = *len {
                        fill(m, &mut map[start..start + len]);
                    }
                }
                map.make_read_only().ok()
            })
            .map(Arc::new);
        let Some(arena) = arena else {
            return vec![None; mats.len()];
        };
        mats.iter()
            .zip(&lens)
            .zip(&starts)
            .map(|((&(ty, _, rows, cols), len), &start)| {
                len.map(|len| Packed {
                    ty,
                    rows: rows / GROUP_ROWS * GROUP_ROWS,
                    cols,
                    arena: Arc::clone(&arena),
                    start,
                    len,
                })
            })
            .collect()
    }

    /// The packed bytes.
    fn data(&self) -> &[u8] {
        &self.arena[self.start..self.start + self.len]
    }

    /// Rows packed (the matrix's first rows; the rest stay row-major).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Weight type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// Bytes of this matrix's packed form.
    pub fn bytes(&self) -> usize {
        self.len
    }

    /// Rows `8g..8g + 8` times activation row `t` of `xq` into `out`.
    ///
    /// # Panics
    /// If `g` is not a packed group or `xq` does not hold row `t` of
    /// [`Packed::cols`] columns.
    pub fn dot_group(&self, g: usize, xq: &Q8Act, t: usize, out: &mut [f32; GROUP_ROWS]) {
        assert!(xq.cols == self.cols && t < xq.rows && g < self.rows / GROUP_ROWS);
        let nb = self.cols / 32;
        let gb = group_block_bytes(self.ty);
        let grp = &self.data()[g * nb * gb..(g + 1) * nb * gb];
        #[cfg(target_arch = "x86_64")]
        if cpu_reads_packed() {
            // SAFETY: the AVX2 tier (AVX2/FMA/F16C) is active (VNNI is
            // checked inside); bounds checked inside.
            unsafe { dot_group_best(self.ty, grp, xq, t, out) };
            return;
        }
        dot_group_portable(self.ty, grp, xq, t, out);
    }
}

/// Whether this CPU has the products that read the packed layout.
fn cpu_reads_packed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::isa::active().has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The portable form of [`Packed::dot_group`]: the scalar reference
/// [`super::dot_q8_portable`]'s arithmetic, read from the packed layout.
fn dot_group_portable(
    ty: QuantType,
    grp: &[u8],
    xq: &Q8Act,
    t: usize,
    out: &mut [f32; GROUP_ROWS],
) {
    let nb = xq.cols / 32;
    let gb = group_block_bytes(ty);
    let h =
        |b: &[u8], i: usize| half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (k, blk) in grp.chunks_exact(gb).take(nb).enumerate() {
            let xi = t * nb + k;
            let x = &xq.q[xi * 32..xi * 32 + 32];
            let sumi: i32 = (0..32)
                .map(|j| {
                    let w = match ty {
                        QuantType::Q4_1 => {
                            let pair = &blk[32 + 32 * (r / 2)..];
                            ((pair[j] >> (4 * (r % 2))) & 0x0f) as i32
                        }
                        _ => blk[16 + 32 * r + j] as i8 as i32,
                    };
                    w * x[j] as i32
                })
                .sum();
            let scaled = h(blk, 2 * r) * xq.d[xi] * sumi as f32;
            acc += if ty == QuantType::Q4_1 {
                scaled + h(blk, 16 + 2 * r) * xq.s[xi]
            } else {
                scaled
            };
        }
        *o = acc;
    }
}

/// The x86 form this CPU has: VNNI where present, else AVX2.
///
/// # Safety
/// AVX2, FMA and F16C must be present; the bounds are checked inside.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_group_best(
    ty: QuantType,
    grp: &[u8],
    xq: &Q8Act,
    t: usize,
    out: &mut [f32; GROUP_ROWS],
) {
    let vnni = crate::isa::has_vnni();
    // SAFETY: the features each form needs are present (VNNI just
    // checked); bounds are checked inside.
    unsafe {
        match (ty, vnni) {
            (QuantType::Q4_1, true) => dot_group_vnni::<true>(grp, xq, t, out),
            (QuantType::Q4_1, false) => dot_group_avx2::<true>(grp, xq, t, out),
            (_, true) => dot_group_vnni::<false>(grp, xq, t, out),
            (_, false) => dot_group_avx2::<false>(grp, xq, t, out),
        }
    }
}

/// How far ahead of the group-block being multiplied the products prefetch
/// (the packed groups are one linear stream; this is about the distance
/// the row-major products use: four groups of four rows).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 6 * 1024;

/// Defines the eight-row product of a packed group (`Q4` selects Q4_1,
/// else Q8_0) for one x86 feature set; `$acc4` adds each group of four
/// u8 × i8 products into an `i32` lane.
macro_rules! dot_group_x86 {
    ($(#[$doc:meta])* $name:ident, $features:literal, $acc4:path) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const Q4: bool>(
            grp: &[u8],
            xq: &Q8Act,
            t: usize,
            out: &mut [f32; GROUP_ROWS],
        ) {
            use std::arch::x86_64::*;
            let nb = xq.cols / 32;
            let gb = group_block_bytes(if Q4 { QuantType::Q4_1 } else { QuantType::Q8_0 });
            assert!(grp.len() >= nb * gb && xq.q.len() >= (t + 1) * nb * 32);
            assert!(xq.d.len() >= (t + 1) * nb && xq.s.len() >= (t + 1) * nb);
            let low = _mm256_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); GROUP_ROWS];
            let mut tail = _mm256_setzero_ps();
            let mut ds = [0.0f32; GROUP_ROWS];
            for k in 0..nb {
                let xi = t * nb + k;
                let ahead = grp.as_ptr().wrapping_add(k * gb + PREFETCH_AHEAD);
                for l in (0..gb).step_by(64) {
                    // A prefetch never faults, so the address may pass the end.
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                }
                // SAFETY: the asserts above bound every read: 32 i8 of x,
                // its d and s, and the `gb` bytes of group-block k.
                unsafe {
                    let b = grp.as_ptr().add(k * gb);
                    let xv = _mm256_loadu_si256(xq.q.as_ptr().add(xi * 32) as *const __m256i);
                    let xd = _mm256_set1_ps(*xq.d.get_unchecked(xi));
                    // d·xd for the eight rows, as the row-major form's
                    // `scale * xd`, one lane per row.
                    let d8 = _mm256_mul_ps(
                        _mm256_cvtph_ps(_mm_loadu_si128(b as *const __m128i)),
                        xd,
                    );
                    _mm256_storeu_ps(ds.as_mut_ptr(), d8);
                    if Q4 {
                        let m8 = _mm256_cvtph_ps(_mm_loadu_si128(b.add(16) as *const __m128i));
                        let xs = _mm256_set1_ps(*xq.s.get_unchecked(xi));
                        // `tail[r] += m · xs` for every row at once.
                        tail = _mm256_add_ps(tail, _mm256_mul_ps(m8, xs));
                        for p in 0..GROUP_ROWS / 2 {
                            let v = _mm256_loadu_si256(b.add(32 + 32 * p) as *const __m256i);
                            let w0 = _mm256_and_si256(v, low);
                            let w1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            let p0 = $acc4(_mm256_setzero_si256(), w0, xv);
                            let p1 = $acc4(_mm256_setzero_si256(), w1, xv);
                            acc[2 * p] = _mm256_fmadd_ps(
                                _mm256_set1_ps(ds[2 * p]),
                                _mm256_cvtepi32_ps(p0),
                                acc[2 * p],
                            );
                            acc[2 * p + 1] = _mm256_fmadd_ps(
                                _mm256_set1_ps(ds[2 * p + 1]),
                                _mm256_cvtepi32_ps(p1),
                                acc[2 * p + 1],
                            );
                        }
                    } else {
                        for r in 0..GROUP_ROWS {
                            let wv = _mm256_loadu_si256(b.add(16 + 32 * r) as *const __m256i);
                            // |w| · sign(x, w): unsigned × signed.
                            let p32 = $acc4(
                                _mm256_setzero_si256(),
                                _mm256_sign_epi8(wv, wv),
                                _mm256_sign_epi8(xv, wv),
                            );
                            acc[r] = _mm256_fmadd_ps(
                                _mm256_set1_ps(ds[r]),
                                _mm256_cvtepi32_ps(p32),
                                acc[r],
                            );
                        }
                    }
                }
            }
            let mut tails = [0.0f32; GROUP_ROWS];
            // SAFETY: eight floats of room.
            unsafe { _mm256_storeu_ps(tails.as_mut_ptr(), tail) };
            for r in 0..GROUP_ROWS {
                // SAFETY: AVX2 is enabled in this function.
                out[r] = unsafe { super::hsum(acc[r]) } + tails[r];
            }
        }
    };
}

dot_group_x86!(
    /// Eight packed rows times activation row `t` with AVX2
    /// (`vpmaddubsw` + `vpmaddwd`): per row, the same lanes, float
    /// operations and order as [`super::dot_q8_rows_avx2`].
    dot_group_avx2,
    "avx2,fma,f16c",
    super::acc4_maddubs
);

dot_group_x86!(
    /// [`dot_group_avx2`] with `vpdpbusd` (AVX-512 VNNI on 256-bit
    /// registers): the same exact `i32` sums.
    dot_group_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    super::acc4_vnni
);

#[cfg(test)]
mod tests {
    use super::super::tests::data;
    use super::super::{dot_q8, dot_q8_portable, quantize};
    use super::*;

    /// Every packed group, on every CPU form, gives the bits of the
    /// row-major product of the same rows (and the portable form those of
    /// the scalar reference), for several widths and activation rows.
    #[test]
    fn packed_groups_match_row_major_products_bit_for_bit() {
        for ty in [QuantType::Q4_1, QuantType::Q8_0] {
            for (rows, cols) in [(8, 32), (16, 96), (24, 576), (13, 1536)] {
                let w = quantize(ty, &data(rows * cols, (rows * cols) as u64)).unwrap();
                let tokens = 3;
                let mut xq = Q8Act::with_capacity(tokens, cols);
                xq.quantize(&data(tokens * cols, 7 + cols as u64), tokens, cols);
                let p = Packed::pack_all_on(&[(ty, &w, rows, cols)], true)[0]
                    .clone()
                    .unwrap();
                assert_eq!(p.rows(), rows / 8 * 8);
                assert_eq!(p.bytes(), p.rows() * ty.row_bytes(cols));
                let rb = ty.row_bytes(cols);
                let nb = cols / 32;
                let gb = group_block_bytes(ty);
                for g in 0..rows / 8 {
                    for t in 0..tokens {
                        let grp = &p.data()[g * nb * gb..(g + 1) * nb * gb];
                        let mut port = [0.0; 8];
                        dot_group_portable(ty, grp, &xq, t, &mut port);
                        let mut fast = [0.0; 8];
                        p.dot_group(g, &xq, t, &mut fast);
                        for r in 0..8 {
                            let row = &w[(g * 8 + r) * rb..(g * 8 + r + 1) * rb];
                            let want = dot_q8_portable(ty, row, &xq, t);
                            assert_eq!(
                                port[r].to_bits(),
                                want.to_bits(),
                                "{ty:?} portable g{g} r{r} t{t}"
                            );
                            if cpu_reads_packed() {
                                let want = dot_q8(ty, row, &xq, t);
                                assert_eq!(
                                    fast[r].to_bits(),
                                    want.to_bits(),
                                    "{ty:?} {cols} g{g} r{r} t{t}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_pack_and_shares_one_mapping() {
        let w = vec![0u8; 16 * 34];
        let all = Packed::pack_all_on(
            &[
                (QuantType::Q4_0, &w, 16, 32),
                (QuantType::Q4_1, &w, 7, 32),
                (QuantType::Q4_1, &w, 16, 48),
                (QuantType::Q4_1, &w[..100], 16, 32),
                (QuantType::Q4_1, &w, 16, 32),
                (QuantType::Q8_0, &w, 12, 32),
            ],
            true,
        );
        let some: Vec<bool> = all.iter().map(Option::is_some).collect();
        assert_eq!(some, [false, false, false, false, true, true]);
        let (a, b) = (all[4].as_ref().unwrap(), all[5].as_ref().unwrap());
        assert!(Arc::ptr_eq(&a.arena, &b.arena));
        assert_eq!(
            (a.rows(), a.bytes(), b.rows(), b.bytes()),
            (16, 320, 8, 272)
        );
        assert_eq!(b.start % 64, 0);
        assert_eq!(
            Packed::new(QuantType::Q4_1, &w, 16, 32).is_some(),
            cpu_reads_packed()
        );
    }
}
