//! # osprey-tests
//!
//! End-to-end tests across crates live in `tests/`; this library holds what
//! they share: locating `../shared` (skipping visibly when it is absent) and
//! comparing tensors.

use std::path::PathBuf;

/// The shared test-data folder (`OSPREY_SHARED`, else `../shared` beside the
/// repository), or `None` — after printing a visible SKIP line — when absent.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("OSPREY_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    if dir.join("models").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED {test}: shared test data not found at {} (set OSPREY_SHARED)",
            dir.display()
        );
        None
    }
}

/// Largest absolute difference, and the reference's range (max − min).
pub fn max_abs_and_range(got: &[f32], want: &[f32]) -> (f32, f32) {
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        // NaN (an output never written) counts as infinitely wrong:
        // `f32::max` alone would skip it.
        .map(|e| if e.is_nan() { f32::INFINITY } else { e })
        .fold(0.0f32, f32::max);
    let lo = want.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    (max_abs, hi - lo)
}

/// `NAME` → file-name form used by the references and `osprey run`.
pub use osprey_engine::npy::sanitize_name as sanitize;

/// The assistant LLM (`OSPREY_LLM_MODEL`, else the cache that
/// `scripts/fetch-llm.sh` fills), or `None` — after a visible SKIP line.
pub fn llm_model(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("OSPREY_LLM_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("OSPREY_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("osprey"))
                })
                .or_else(|| {
                    std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/osprey"))
                })
                .unwrap_or_default();
            cache.join("llm/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED {test}: LLM not found at {} (run scripts/fetch-llm.sh or set OSPREY_LLM_MODEL)",
            path.display()
        );
        None
    }
}
