//! `osprey detect` and `osprey classify`: an image in, labelled boxes or
//! classes out, with the latency of each stage.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use osprey_models::vision::desc::{ModelDesc, ModelKind};
use osprey_models::vision::pipeline::label_of;
use osprey_models::vision::{
    draw, encode_rgb, read_image, Classifier, Detector, Frame, FrameLimits, PixelFormat, RgbImage,
    StageTimes, YuvMatrix,
};
use serde_json::json;

use crate::cli::{load_engine, threads, ModelArgs};

/// Options shared by `detect` and `classify`.
#[derive(Args, Debug)]
pub struct VisionArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Model description: input, preprocessing, decoder, labels
    /// (e.g. models/zoo/centernet_mbv3_coco_512.toml).
    #[arg(long = "model-desc", value_name = "M.toml")]
    pub model_desc: PathBuf,
    /// Image file (JPEG or PNG).
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Feed the image as a camera would: convert it to this raw format
    /// first (rgb8, bgr8, rgba8, bgra8, gray8, nv12, yuyv; YUV as BT.601
    /// limited range), so preprocessing starts from that format.
    #[arg(long = "frame-format", value_name = "FMT")]
    pub frame_format: Option<String>,
    /// Run the frame this many times and report the median latency of
    /// each stage (the first run, which warms caches up, is not counted
    /// when there are more).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Largest accepted image side in pixels.
    #[arg(long = "max-side", default_value_t = 8192)]
    pub max_side: usize,
}

/// `osprey detect`.
#[derive(Args, Debug)]
pub struct DetectArgs {
    /// Common options.
    #[command(flatten)]
    pub common: VisionArgs,
    /// Also write a copy of the image with labelled boxes (PNG or JPEG by
    /// extension).
    #[arg(long, value_name = "OUT.png")]
    pub draw: Option<PathBuf>,
}

/// `osprey classify`.
#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// Common options.
    #[command(flatten)]
    pub common: VisionArgs,
    /// Classes to report (default: the description's `decode.top`, else 5).
    #[arg(long)]
    pub top: Option<usize>,
}

struct Loaded {
    desc: ModelDesc,
    image: RgbImage,
    raw: Option<(Vec<u8>, PixelFormat)>,
}

impl Loaded {
    fn new(a: &VisionArgs) -> Result<Loaded> {
        if a.repeat == 0 {
            bail!("--repeat must be at least 1");
        }
        let desc = ModelDesc::load(&a.model_desc)?;
        let limits = FrameLimits {
            max_width: a.max_side,
            max_height: a.max_side,
        };
        let image = read_image(&a.image, &limits).with_context(|| a.image.display().to_string())?;
        let raw = match &a.frame_format {
            Some(f) => {
                let format = PixelFormat::parse(f).map_err(|_| {
                    anyhow::anyhow!(
                        "--frame-format {f:?}: expected one of {}",
                        PixelFormat::ALL.map(|p| p.name()).join(", ")
                    )
                })?;
                Some((encode_rgb(&image, format, YuvMatrix::Bt601Limited), format))
            }
            None => None,
        };
        Ok(Loaded { desc, image, raw })
    }

    fn frame(&self) -> Result<Frame<'_>> {
        Ok(match &self.raw {
            Some((bytes, format)) => {
                Frame::packed(bytes, *format, self.image.width, self.image.height)?
            }
            None => self.image.frame(),
        })
    }

    fn shapes(&self) -> HashMap<String, Vec<usize>> {
        let mut m = HashMap::new();
        m.insert(self.desc.input.name.clone(), self.desc.input_shape());
        m
    }
}

/// Per-stage medians over the timed runs.
fn median_times(samples: &[StageTimes]) -> StageTimes {
    let med = |f: fn(&StageTimes) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    StageTimes {
        preprocess_ms: med(|t| t.preprocess_ms),
        infer_ms: med(|t| t.infer_ms),
        decode_ms: med(|t| t.decode_ms),
    }
}

fn latency_json(t: &StageTimes, runs: usize) -> serde_json::Value {
    json!({
        "preprocess": t.preprocess_ms,
        "infer": t.infer_ms,
        "decode": t.decode_ms,
        "total": t.total_ms(),
        "runs": runs,
    })
}

fn latency_line(t: &StageTimes, runs: usize) -> String {
    format!(
        "latency ms  preprocess {:.3}  infer {:.3}  decode {:.3}  total {:.3}{}",
        t.preprocess_ms,
        t.infer_ms,
        t.decode_ms,
        t.total_ms(),
        if runs > 1 {
            format!("  (median of {runs})")
        } else {
            String::new()
        }
    )
}

fn frame_note(l: &Loaded) -> String {
    match &l.raw {
        Some((_, f)) => format!(" as {f}"),
        None => String::new(),
    }
}

/// Runs `f` `repeat` times (plus one untimed warm-up when repeating).
fn timed<T>(
    repeat: usize,
    mut f: impl FnMut() -> Result<(T, StageTimes)>,
) -> Result<(T, StageTimes, usize)> {
    if repeat > 1 {
        f()?;
    }
    let mut samples = Vec::with_capacity(repeat);
    let mut last = None;
    for _ in 0..repeat {
        let (v, t) = f()?;
        samples.push(t);
        last = Some(v);
    }
    let v = last.context("no run")?;
    Ok((v, median_times(&samples), repeat))
}

/// `osprey detect`.
pub fn detect(a: DetectArgs) -> Result<()> {
    let c = &a.common;
    let l = Loaded::new(c)?;
    if l.desc.kind != ModelKind::Detector {
        bail!(
            "{}: '{}' is a classifier, not a detector (use `osprey classify`)",
            c.model_desc.display(),
            l.desc.name
        );
    }
    let engine = load_engine(&c.model, l.shapes())?;
    let mut det = Detector::new(engine, l.desc.clone(), threads(&c.model)?)
        .with_context(|| c.model_desc.display().to_string())?;
    let frame = l.frame()?;
    let (dets, times, runs) = timed(c.repeat, || {
        let (d, t) = det.detect(&frame)?;
        Ok((d.to_vec(), t))
    })?;
    let labels = det.labels();
    if let Some(path) = &a.draw {
        let mut copy = l.image.clone();
        draw::draw_detections(&mut copy, &dets, labels);
        draw::save(&copy, path)?;
    }
    if c.json {
        let v = json!({
            "image": c.image.display().to_string(),
            "width": l.image.width,
            "height": l.image.height,
            "model": l.desc.name,
            "detections": dets.iter().map(|d| json!({
                "label": label_of(labels, d.class_id),
                "class_id": d.class_id,
                "score": d.score,
                "box": d.bbox(),
            })).collect::<Vec<_>>(),
            "latency_ms": latency_json(&times, runs),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{}  {}x{}{}  {}: {} detection{}",
        c.image.display(),
        l.image.width,
        l.image.height,
        frame_note(&l),
        l.desc.name,
        dets.len(),
        if dets.len() == 1 { "" } else { "s" }
    );
    if !dets.is_empty() {
        println!(
            "  {:<16} {:>6} {:>8} {:>8} {:>8} {:>8}",
            "label", "score", "x1", "y1", "x2", "y2"
        );
    }
    for d in &dets {
        println!(
            "  {:<16} {:>6.3} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            label_of(labels, d.class_id),
            d.score,
            d.x1,
            d.y1,
            d.x2,
            d.y2
        );
    }
    println!("{}", latency_line(&times, runs));
    if let Some(path) = &a.draw {
        println!("drew {}", path.display());
    }
    Ok(())
}

/// `osprey classify`.
pub fn classify(a: ClassifyArgs) -> Result<()> {
    let c = &a.common;
    let l = Loaded::new(c)?;
    if l.desc.kind != ModelKind::Classifier {
        bail!(
            "{}: '{}' is a detector, not a classifier (use `osprey detect`)",
            c.model_desc.display(),
            l.desc.name
        );
    }
    let k = a.top.or(l.desc.decode.top).unwrap_or(5);
    if k == 0 {
        bail!("--top must be at least 1");
    }
    let engine = load_engine(&c.model, l.shapes())?;
    let mut cls = Classifier::new(engine, l.desc.clone(), threads(&c.model)?)
        .with_context(|| c.model_desc.display().to_string())?;
    let frame = l.frame()?;
    let (classes, times, runs) = timed(c.repeat, || {
        let (v, t) = cls.classify(&frame, k)?;
        Ok((v.to_vec(), t))
    })?;
    let labels = cls.labels();
    if c.json {
        let v = json!({
            "image": c.image.display().to_string(),
            "width": l.image.width,
            "height": l.image.height,
            "model": l.desc.name,
            "classes": classes.iter().map(|s| json!({
                "label": label_of(labels, s.class_id),
                "class_id": s.class_id,
                "prob": s.prob,
            })).collect::<Vec<_>>(),
            "latency_ms": latency_json(&times, runs),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{}  {}x{}{}  {}",
        c.image.display(),
        l.image.width,
        l.image.height,
        frame_note(&l),
        l.desc.name
    );
    for s in &classes {
        let bar = "#".repeat((s.prob.clamp(0.0, 1.0) * 30.0).round() as usize);
        println!(
            "  {:>5} {:<28} {:>7.4}  {bar}",
            s.class_id,
            label_of(labels, s.class_id),
            s.prob
        );
    }
    println!("{}", latency_line(&times, runs));
    Ok(())
}
