//! Helpers for the tests that drive the `osprey` binary: the command, a
//! fresh temp dir, output checks, .npy files, and ../shared (skipped
//! visibly when absent).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `osprey` binary of this build.
pub fn osprey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_osprey"))
}

/// A fresh, empty temp dir named after the test file's `prefix` and `tag`.
pub fn dir(prefix: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("osprey-{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Asserts success (showing stderr otherwise); returns stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts exit code 1 with exactly one stderr line containing `needle`.
pub fn one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

/// Writes an f32 .npy file.
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    osprey_engine::npy::write(path, shape, data).unwrap();
}

/// Reads an f32 .npy file's values.
pub fn read_npy(path: &Path) -> Vec<f32> {
    osprey_engine::npy::read(path, true).unwrap().data
}

/// `../shared` next to the repository, or `None` after saying the test is
/// skipped.
pub fn shared() -> Option<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if d.join("models").is_dir() {
        Some(d)
    } else {
        eprintln!("SKIPPED: ../shared is absent");
        None
    }
}
