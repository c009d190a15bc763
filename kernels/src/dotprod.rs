//! The aarch64 dot-product extension's `sdot` (four `i8` products summed
//! into each `i32` lane), in the two forms the INT8 kernels use. Inline asm
//! because the `vdotq_s32` / `vdotq_laneq_s32` intrinsics are not stable in
//! Rust yet; the `.arch_extension` directive lets the assembler accept the
//! instruction in any function, so callers need no `target_feature` and
//! check [`crate::isa::has_dotprod`] at run time instead.

use std::arch::aarch64::{int32x4_t, int8x16_t};

/// `acc[i] + Σ_t w[4i + t]·x[4i + t]`.
///
/// # Safety
/// The CPU must have the dot-product extension.
#[inline(always)]
pub unsafe fn sdot(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: a register-only instruction; the caller guarantees the
    // extension (the directive only lets the assembler accept it).
    unsafe {
        std::arch::asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// By element: `acc[i] + Σ_t b[4i + t]·a[4L + t]` (group `L` of `a`
/// broadcast to every lane).
///
/// # Safety
/// The CPU must have the dot-product extension.
#[inline(always)]
pub unsafe fn sdot_lane<const L: i32>(acc: int32x4_t, b: int8x16_t, a: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: as for `sdot`.
    unsafe {
        std::arch::asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {b:v}.16b, {a:v}.4b[{l}]",
            acc = inout(vreg) acc,
            b = in(vreg) b,
            a = in(vreg) a,
            l = const L,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}
