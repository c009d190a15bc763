//! Environment overrides, declared once, typed, with defaults.
//!
//! | variable | values | default | effect |
//! |---|---|---|---|
//! | `OSPREY_ISA` | `scalar`, `avx2`, `avx512`, `neon`, `auto` | `auto` | caps the ISA tier kernels may use, so CI can test every tier |
//! | `OSPREY_AMX` | `on`, `off` | `on` | `off` keeps the INT8 GEMM on AVX-512 VNNI on a CPU with AMX (comparisons, and tests of the VNNI tile there) |
//! | `OSPREY_POOL_SPIN_US` | microseconds | `2000` | how long an idle kernel thread polls for work before sleeping: lower saves CPU between frames, higher avoids wake-up latency between layers |

use crate::error::KernelError;
use crate::isa::Isa;

/// `OSPREY_ISA`: the highest ISA tier kernels may use; `None` means "best detected".
pub fn isa_cap() -> Result<Option<Isa>, KernelError> {
    match std::env::var("OSPREY_ISA") {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(None),
            "scalar" => Ok(Some(Isa::Scalar)),
            "avx2" => Ok(Some(Isa::Avx2Fma)),
            "avx512" => Ok(Some(Isa::Avx512)),
            "neon" => Ok(Some(Isa::Neon)),
            _ => Err(KernelError::BadKnob {
                knob: "OSPREY_ISA",
                value: v,
                expected: "one of scalar, avx2, avx512, neon, auto",
            }),
        },
    }
}

/// `OSPREY_AMX`: whether the INT8 kernels may use AMX tiles where the CPU
/// and the OS allow them (default on; `off`, `0`, `no` or `false` turn them
/// off; any other value leaves them on).
pub fn amx_allowed() -> bool {
    !matches!(
        std::env::var("OSPREY_AMX")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref(),
        Ok("off" | "0" | "no" | "false")
    )
}

/// `OSPREY_POOL_SPIN_US`: how long idle pool workers spin before sleeping
/// (default 2 ms; invalid values fall back to the default).
pub fn pool_spin() -> std::time::Duration {
    let us = std::env::var("OSPREY_POOL_SPIN_US")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(2000);
    std::time::Duration::from_micros(us)
}
