//! Environment overrides, declared once, typed, with defaults.
//!
//! | variable | values | default | effect |
//! |---|---|---|---|
//! | `OSPREY_ISA` | `scalar`, `avx2`, `neon`, `auto` | `auto` | caps the ISA tier kernels may use, so CI can test every tier |

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
            "neon" => Ok(Some(Isa::Neon)),
            _ => Err(KernelError::BadKnob {
                knob: "OSPREY_ISA",
                value: v,
                expected: "one of scalar, avx2, neon, auto",
            }),
        },
    }
}
