//! The device an engine was tuned for.
//!
//! Tactics are timed on one machine; on another CPU (other ISA features, other
//! caches) they may be wrong or not even run. An engine records this
//! fingerprint and refuses to load where it does not match.

use serde::{Deserialize, Serialize};

/// What identifies a device for tuning purposes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// `x86_64`, `aarch64`, ...
    pub arch: String,
    /// The kernel ISA tier in use (`avx2`, `neon`, `scalar`).
    pub isa: String,
    /// CPU features that change which kernels can run.
    pub features: Vec<String>,
    /// CPU model name (informational; not compared).
    pub cpu: String,
}

impl Fingerprint {
    /// This machine, as the kernels see it now.
    pub fn current() -> Fingerprint {
        Fingerprint {
            arch: std::env::consts::ARCH.to_string(),
            isa: osprey_kernels::isa::active().name().to_string(),
            features: osprey_kernels::isa::cpu_features()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            cpu: cpu_model(),
        }
    }

    /// Whether an engine tuned for `self` may run on `other`.
    pub fn compatible_with(&self, other: &Fingerprint) -> bool {
        self.arch == other.arch && self.isa == other.isa && self.features == other.features
    }

    /// A short human description.
    pub fn describe(&self) -> String {
        format!(
            "{} {} [{}] ({})",
            self.arch,
            self.isa,
            self.features.join(","),
            self.cpu
        )
    }

    /// A short stable key (for timing caches): arch, ISA and features.
    pub fn key(&self) -> String {
        format!("{}-{}-{}", self.arch, self.isa, self.features.join("+"))
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| {
                    l.starts_with("model name")
                        || l.starts_with("Model")
                        || l.starts_with("CPU part")
                })
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_is_compatible_with_itself_not_with_other_isa() {
        let a = Fingerprint::current();
        assert!(a.compatible_with(&a.clone()));
        let mut b = a.clone();
        b.isa = "other".into();
        assert!(!a.compatible_with(&b));
        let mut c = a.clone();
        c.cpu = "another model".into();
        assert!(
            a.compatible_with(&c),
            "the model name alone does not matter"
        );
    }
}
