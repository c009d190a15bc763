//! Which instruction-set tier the kernels run with, chosen at run time.
//!
//! Binaries are built for the baseline target (never `target-cpu=native`); the
//! fastest kernels this CPU supports are selected once, at first use. On
//! aarch64 NEON is part of the baseline, so the portable kernels are compiled
//! to NEON by LLVM; on x86-64 the AVX2+FMA kernels are selected when present.

use std::sync::OnceLock;

/// An instruction-set tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, vectorised only as far as the baseline target allows.
    Scalar,
    /// aarch64 Advanced SIMD (baseline on aarch64).
    Neon,
    /// x86-64 AVX2 with FMA3 and F16C.
    Avx2Fma,
    /// x86-64 AVX-512 (F, BW, DQ, VL) on top of [`Isa::Avx2Fma`]: 32 vector
    /// registers of 16 floats. Every AVX2 kernel runs on this tier too.
    Avx512,
}

impl Isa {
    /// Short lowercase name, as used by `OSPREY_ISA` and in engine fingerprints.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Neon => "neon",
            Isa::Avx2Fma => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether AVX2, FMA and F16C kernels may run on this tier.
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2Fma | Isa::Avx512)
    }

    /// Whether AVX-512 (F, BW, DQ, VL) kernels may run on this tier.
    pub fn has_avx512(self) -> bool {
        self == Isa::Avx512
    }
}

/// The best tier this CPU supports, ignoring overrides.
pub fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        // F16C comes with every AVX2 CPU; the tier relies on it too.
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            return Isa::Avx2Fma;
        }
        Isa::Scalar
    }
    #[cfg(target_arch = "aarch64")]
    {
        Isa::Neon
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Isa::Scalar
    }
}

/// CPU features worth recording in a device fingerprint (sorted, stable).
pub fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($name) { f.push($name); }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512dq",
            "avx512vl",
            "avx512vnni",
            "avx512vbmi"
        );
        // AMX is not in the stable detection macro: CPUID directly.
        if amx_int8_in_cpu() {
            f.push("amx-int8");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        f.push("neon");
        if has_dotprod() {
            f.push("dotprod");
        }
        if std::arch::is_aarch64_feature_detected!("fp16") {
            f.push("fp16");
        }
    }
    f
}

/// Whether the active tier is [`Isa::Avx512`] and the CPU has AVX-512 VNNI
/// (`vpdpbusd`: four u8 × i8 products summed into each i32 lane in one
/// instruction; Ice Lake, Zen 4 and later). Always false elsewhere.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| {
            active() == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`has_vnni`] holds and the CPU also has AVX-512 VBMI (`vpermb`:
/// any byte of a 64-byte register to any position; Ice Lake, Zen 4 and
/// later, not Cascade Lake). Always false elsewhere.
pub fn has_vnni_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VBMI: OnceLock<bool> = OnceLock::new();
        *VBMI.get_or_init(|| has_vnni() && std::arch::is_x86_feature_detected!("avx512vbmi"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether CPUID reports AMX tiles with INT8 dot products (AMX-TILE and
/// AMX-INT8: Sapphire Rapids and later Xeons).
#[cfg(target_arch = "x86_64")]
fn amx_int8_in_cpu() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // Leaf 7 exists on every CPU with AVX2, which the caller has seen.
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 24) != 0 && edx & (1 << 25) != 0
}

/// Whether the INT8 kernels may use AMX tiles: [`has_vnni`] holds (their
/// epilogue is the AVX-512 one), CPUID reports AMX-TILE and AMX-INT8,
/// `OSPREY_AMX` does not turn them off, and Linux granted this process the
/// tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`, asked
/// once, here: a tile instruction without it is an illegal instruction).
/// Always false elsewhere than x86-64 Linux.
pub fn has_amx_int8() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static AMX: OnceLock<bool> = OnceLock::new();
        *AMX.get_or_init(|| {
            if !(has_vnni() && amx_int8_in_cpu() && crate::knobs::amx_allowed()) {
                return false;
            }
            const ARCH_PRCTL: i64 = 158;
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            let ret: i64;
            // SAFETY: the arch_prctl system call with a request code and a
            // feature number reads and writes no memory of this process; it
            // returns 0 or a negative errno in rax (and the syscall
            // instruction clobbers rcx and r11).
            unsafe {
                std::arch::asm!(
                    "syscall",
                    inlateout("rax") ARCH_PRCTL => ret,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack),
                );
            }
            ret == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Whether the CPU has the aarch64 dot-product extension (`sdot`; Jetson
/// Orin's Cortex-A78AE does). Always false elsewhere.
pub fn has_dotprod() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

static ACTIVE: OnceLock<Isa> = OnceLock::new();

/// The tier kernels use: the detected one, capped by `OSPREY_ISA`.
///
/// An invalid `OSPREY_ISA` is reported once on stderr and ignored, so a typo
/// cannot take a robot down; [`crate::knobs::isa_cap`] gives the typed error
/// to front-ends that want to refuse it.
pub fn active() -> Isa {
    *ACTIVE.get_or_init(|| {
        let best = detect();
        match crate::knobs::isa_cap() {
            Ok(Some(Isa::Scalar)) => Isa::Scalar,
            Ok(Some(cap)) if cap == best => best,
            // A lower x86 tier is a subset of the detected one.
            Ok(Some(Isa::Avx2Fma)) if best == Isa::Avx512 => Isa::Avx2Fma,
            Ok(Some(cap)) => {
                eprintln!(
                    "warning: OSPREY_ISA={} is not available on this CPU; using {}",
                    cap.name(),
                    best.name()
                );
                best
            }
            Ok(None) => best,
            Err(e) => {
                eprintln!("warning: {e}; using {}", best.name());
                best
            }
        }
    })
}

/// Asks the CPU to fetch the cache lines of the `bytes` bytes at `p` for
/// writing (x86 PREFETCHW), so that a store-bound kernel's coming stores
/// find their lines already owned instead of each waiting for one.
///
/// A hint only: it never faults, whatever the address, and changes no
/// results. Elsewhere than x86-64 it does nothing (not measured there).
#[inline(always)]
pub(crate) fn prefetch_write(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        let end = p.wrapping_add(bytes);
        let mut line = p.wrapping_sub(p as usize % 64);
        while line < end {
            // SAFETY: a prefetch reads and writes nothing and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(line.cast()) };
            line = line.wrapping_add(64);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_never_exceeds_detected() {
        let (a, d) = (active(), detect());
        assert!(a == d || a == Isa::Scalar || (a == Isa::Avx2Fma && d == Isa::Avx512));
        assert!(!has_vnni() || a == Isa::Avx512);
        assert!(!has_amx_int8() || has_vnni());
    }
}
