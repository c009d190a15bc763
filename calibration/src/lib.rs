//! # osprey-calibration
//!
//! INT8 calibration: run the FP32 engine over a calibration set, collect
//! per-tensor statistics, pick a clipping threshold per tensor, write a
//! calibration cache that TensorRT tooling can read.
//!
//! | module | what it holds |
//! |---|---|
//! | [`stats`] | per-tensor range and 2048-bin histograms of `|x|`, collected in two passes |
//! | [`threshold`] | entropy (TensorRT's IInt8EntropyCalibrator2 KL search), percentile, min-max |
//! | [`cache`] | the calibration cache in TensorRT's text layout |
//! | [`dataset`] | calibration inputs: image folders through a model description, or `.npy` tensors |

pub mod cache;
pub mod dataset;
pub mod stats;
pub mod threshold;

pub use cache::CalibrationCache;
pub use stats::{Collector, TensorStats};
pub use threshold::Method;

/// Everything that can go wrong while calibrating.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A malformed calibration cache.
    #[error("calibration cache line {line}: {msg}")]
    Cache {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// No usable calibration input.
    #[error("{0}")]
    Dataset(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] osprey_engine::EngineError),
    /// Preprocessing failed.
    #[error(transparent)]
    Vision(#[from] osprey_models::vision::VisionError),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, CalibError>;

use std::path::PathBuf;
use std::sync::Arc;

use osprey_engine::{Engine, ExecutionContext};

/// What a calibration run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The cache (scale = threshold / 127 per tensor).
    pub cache: CalibrationCache,
    /// Statistics per tensor, execution order.
    pub stats: Vec<TensorStats>,
    /// The chosen threshold per tensor (same order).
    pub thresholds: Vec<f32>,
    /// Samples used.
    pub used: usize,
    /// Files skipped, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Runs the FP32 engine over `data` twice (ranges, then histograms),
/// observing every tensor, and picks a threshold per tensor with `method`.
/// `progress(pass, done, total)` is called after each sample (pass 1 or 2).
pub fn calibrate(
    engine: Arc<Engine>,
    input: usize,
    data: &mut dataset::Dataset,
    method: Method,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Result<Outcome> {
    let mut ctx = ExecutionContext::new(engine, threads);
    let mut collector = Collector::new();
    let n = data.files().len();
    let mut ok = Vec::with_capacity(n);
    let mut skipped = Vec::new();
    for pass in 1..=2 {
        if pass == 2 {
            collector.start_histograms();
        }
        let todo: Vec<usize> = if pass == 1 {
            (0..n).collect()
        } else {
            ok.clone()
        };
        for (k, &i) in todo.iter().enumerate() {
            let loaded = data.load(i, ctx.input_mut(input)?);
            match loaded {
                Ok(()) => {
                    ctx.run_observed(&mut |name, x| collector.observe(name, x))?;
                    if pass == 1 {
                        ok.push(i);
                    }
                }
                Err(why) => {
                    if pass == 1 {
                        skipped.push((data.files()[i].clone(), why));
                    }
                }
            }
            progress(pass, k + 1, todo.len());
        }
        if ok.is_empty() {
            return Err(CalibError::Dataset(format!(
                "none of the {n} calibration files could be used (first: {})",
                skipped
                    .first()
                    .map(|(p, w)| format!("{}: {w}", p.display()))
                    .unwrap_or_default()
            )));
        }
    }
    let stats = collector.stats().to_vec();
    let thresholds: Vec<f32> = stats.iter().map(|s| method.threshold(s)).collect();
    let cache = CalibrationCache {
        header: method.cache_header().to_string(),
        scales: stats
            .iter()
            .zip(&thresholds)
            .map(|(s, &t)| (s.name.clone(), t / 127.0))
            .collect(),
    };
    Ok(Outcome {
        cache,
        stats,
        thresholds,
        used: ok.len(),
        skipped,
    })
}
