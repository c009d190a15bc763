//! `osprey calibrate`: run the FP32 model over a calibration set, pick an
//! INT8 clipping threshold per tensor, write a TensorRT-layout cache.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use osprey_calibration::dataset::Dataset;
use osprey_calibration::{calibrate as run_calibration, Method};
use osprey_models::vision::desc::ModelDesc;
use serde_json::json;

use crate::cli::{default_threads, load_engine, ModelArgs};

/// Threshold algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// TensorRT's entropy calibrator 2 (KL divergence over 2048-bin histograms).
    Entropy,
    /// A percentile of |x| (--percentile).
    Percentile,
    /// The largest |x|.
    Minmax,
}

/// `osprey calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// ONNX model (calibrated after the same optimisation passes as
    /// `osprey build`, so the cache names the tensors the engine has).
    #[arg(long, value_name = "M.onnx")]
    pub onnx: PathBuf,
    /// Folder of calibration images (JPEG/PNG, recursive); needs --model-desc.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "npy",
        requires = "model_desc"
    )]
    pub images: Option<PathBuf>,
    /// Model description: how the images become the input tensor.
    #[arg(long = "model-desc", value_name = "D.toml")]
    pub model_desc: Option<PathBuf>,
    /// Folder of preprocessed input tensors (.npy, recursive) instead of
    /// images; a model with dynamic input dimensions takes the first
    /// file's shape (files of another size are skipped).
    #[arg(long, value_name = "DIR")]
    pub npy: Option<PathBuf>,
    /// Shape for an input with dynamic dimensions, e.g. `x=1,3,48,192`
    /// (repeatable).
    #[arg(long = "input-shape", value_name = "NAME=D0,D1,...")]
    pub input_shapes: Vec<String>,
    /// Threshold algorithm.
    #[arg(long, value_enum, default_value = "entropy")]
    pub method: MethodArg,
    /// Percentile for --method percentile.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// Use at most this many files (in path order).
    #[arg(long = "max-images", value_name = "N")]
    pub max_images: Option<usize>,
    /// Calibration cache to write (TensorRT layout).
    #[arg(long, value_name = "M.calib")]
    pub out: PathBuf,
    /// Also write per-tensor statistics as JSON.
    #[arg(long, value_name = "report.json")]
    pub report: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `osprey calibrate`.
pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    let method = match a.method {
        MethodArg::Entropy => Method::Entropy,
        MethodArg::Minmax => Method::MinMax,
        MethodArg::Percentile => {
            if !(a.percentile > 0.0 && a.percentile <= 100.0) {
                bail!("--percentile must be in (0, 100]");
            }
            Method::Percentile(a.percentile)
        }
    };
    if a.max_images == Some(0) {
        bail!("--max-images must be at least 1");
    }
    let threads = match a.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => default_threads(),
    };
    let (mut data, shapes, input_name) = match (&a.images, &a.npy) {
        (Some(dir), None) => {
            let path = a
                .model_desc
                .as_ref()
                .context("--images needs --model-desc")?;
            let desc = ModelDesc::load(path).with_context(|| path.display().to_string())?;
            let mut shapes = HashMap::new();
            shapes.insert(desc.input.name.clone(), desc.input_shape());
            let name = desc.input.name.clone();
            (
                Dataset::images(dir, &desc, a.max_images)?,
                shapes,
                Some(name),
            )
        }
        (None, Some(dir)) => (Dataset::npy(dir, a.max_images)?, HashMap::new(), None),
        _ => bail!("give --images DIR --model-desc D.toml, or --npy DIR"),
    };
    let model = ModelArgs {
        onnx: Some(a.onnx.clone()),
        engine: None,
        input_shapes: a.input_shapes.clone(),
        threads: Some(threads),
        no_optimize: false,
    };
    let engine = match load_engine(&model, shapes) {
        Ok(e) => e,
        // A model with dynamic input dimensions calibrated on tensors:
        // take the first tensor's shape.
        Err(first_error) if a.npy.is_some() && a.input_shapes.is_empty() => {
            let bytes = std::fs::read(&a.onnx).with_context(|| a.onnx.display().to_string())?;
            let names = osprey_engine::onnx::input_names(&bytes)
                .map_err(|e| crate::cli::with_model_context(e, &a.onnx))?;
            let (Some(name), Some(file), 1) = (names.first(), data.files().first(), names.len())
            else {
                return Err(first_error);
            };
            let shape = osprey_engine::npy::read(file, true)?.shape;
            let mut shapes = HashMap::new();
            shapes.insert(name.clone(), shape);
            load_engine(&model, shapes).map_err(|_| first_error)?
        }
        Err(e) => return Err(e),
    };
    let inputs: Vec<_> = engine.inputs().cloned().collect();
    let input = match &input_name {
        Some(n) => inputs
            .iter()
            .position(|d| &d.name == n)
            .with_context(|| format!("the model has no input {n:?} (the description names it)"))?,
        None if inputs.len() == 1 => 0,
        None => bail!(
            "--npy calibrates single-input models; this one has {} inputs",
            inputs.len()
        ),
    };
    let bar = ProgressBar::new(data.files().len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} {bar:30} {pos}/{len} samples  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let out = run_calibration(
        engine,
        input,
        &mut data,
        method,
        threads,
        &mut |pass, done, total| {
            bar.set_message(if pass == 1 { "ranges" } else { "histograms" });
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    for (p, why) in &out.skipped {
        eprintln!("warning: skipped {}: {why}", p.display());
    }
    out.cache
        .save(&a.out)
        .with_context(|| a.out.display().to_string())?;
    let tensors: Vec<_> = out
        .stats
        .iter()
        .zip(&out.thresholds)
        .map(|(s, &t)| {
            let clipped = if t > 0.0 && s.hist.len() == osprey_calibration::stats::BINS {
                let first = ((t / s.bin_width()) as usize).min(s.hist.len());
                let total: u64 = s.hist.iter().sum();
                s.hist[first..].iter().sum::<u64>() as f64 / total.max(1) as f64
            } else {
                0.0
            };
            json!({
                "name": s.name,
                "min": s.min,
                "max": s.max,
                "absmax": s.absmax(),
                "threshold": t,
                "scale": t / 127.0,
                "clipped_fraction": clipped,
                "non_finite": s.non_finite,
            })
        })
        .collect();
    if let Some(r) = &a.report {
        let v = json!({
            "model": a.onnx.display().to_string(),
            "method": method.cache_header(),
            "samples": out.used,
            "skipped": out.skipped.iter().map(|(p, w)| json!({"file": p.display().to_string(), "reason": w})).collect::<Vec<_>>(),
            "tensors": tensors,
        });
        std::fs::write(r, serde_json::to_string_pretty(&v)?)
            .with_context(|| r.display().to_string())?;
    }
    println!(
        "calibrated {} tensors on {} sample(s) ({} skipped) with {} in {:.1} s -> {}",
        out.stats.len(),
        out.used,
        out.skipped.len(),
        method.cache_header(),
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    // The tensors whose threshold clips the most of the range: where INT8
    // trades outliers for resolution.
    let mut order: Vec<usize> = (0..out.stats.len()).collect();
    order.sort_by(|&i, &j| {
        let r = |k: usize| out.thresholds[k] / out.stats[k].absmax().max(f32::MIN_POSITIVE);
        r(i).total_cmp(&r(j))
    });
    println!(
        "  {:<40} {:>10} {:>10} {:>7}",
        "tensor (most clipped)", "max|x|", "threshold", "kept"
    );
    for &i in order.iter().take(5) {
        let s = &out.stats[i];
        let t = out.thresholds[i];
        println!(
            "  {:<40} {:>10.4} {:>10.4} {:>6.1}%",
            s.name.chars().take(40).collect::<String>(),
            s.absmax(),
            t,
            100.0 * t / s.absmax().max(f32::MIN_POSITIVE)
        );
    }
    Ok(())
}
