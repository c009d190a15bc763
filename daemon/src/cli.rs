//! The `osprey` subcommands that work on models: `run`, `bench`, `inspect`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use osprey_engine::onnx::{import_file, InputShapes};
use osprey_engine::{npy, Engine, ExecutionContext};
use serde_json::json;

use crate::stats::LatencySummary;

/// osprey — real-time inference for robots: build, run and measure engines.
#[derive(Parser, Debug)]
#[command(
    name = "osprey",
    version,
    about = "osprey: real-time inference for robots — build, run, measure and check engines",
    after_help = "Typical use:\n  osprey inspect --onnx model.onnx\n  osprey build --onnx model.onnx --out model.engine --timing-cache osprey-timing.json\n  osprey bench --engine model.engine\n  osprey detect --onnx models/zoo/centernet_mbv3_coco_512.onnx --model-desc models/zoo/centernet_mbv3_coco_512.toml --image dog.jpg --draw dog-boxes.png\n  osprey chat --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt \"How do I reset the lidar?\"\n  osprey doctor --engine model.engine\n  osprey camera --robot rover1 --images frames/ --fps 15 --encoding nv12\n  osprey ask --robot rover1 \"Why is the left wheel motor hot?\"\n  osprey status --robot rover1 --connect tcp/192.168.1.20:7447"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a model once on .npy inputs and write every output as DIR/<name>.npy.
    Run(RunArgs),
    /// Measure latency and throughput on random inputs (trtexec-style report).
    Bench(BenchArgs),
    /// Show a model's inputs, outputs, operators and memory plan.
    Inspect(InspectArgs),
    /// Optimise a model, time kernel tactics on this device, and write one
    /// engine file that `run`, `bench` and `inspect` load with `--engine`.
    Build(BuildArgs),
    /// Run the FP32 model over calibration images (or .npy tensors), pick
    /// an INT8 threshold per tensor (entropy, percentile or min-max) and
    /// write a calibration cache in TensorRT's layout.
    Calibrate(crate::calibrate::CalibrateArgs),
    /// Detect objects in an image: labelled boxes in image pixels, per-stage
    /// latency, optionally drawn onto a copy of the image.
    Detect(crate::vision::DetectArgs),
    /// Classify an image: the most probable labels, per-stage latency.
    Classify(crate::vision::ClassifyArgs),
    /// Talk to the onboard assistant (a GGUF Llama-family model): one
    /// question with --prompt, or an interactive session that streams.
    Chat(crate::chat::ChatArgs),
    /// Print the token ids of a text as a JSON array (no BOS; special
    /// tokens such as <|im_start|> are single tokens).
    Tokenize(crate::chat::TokenizeArgs),
    /// Check this machine for real-time deployment: GPU and driver, NVRTC,
    /// memlock limit, CPU governor, real-time scheduling, zenoh reachability,
    /// engine/device match. Exits 1 if a check fails.
    Doctor(crate::doctor::DoctorArgs),
    /// Publish image files as camera frames to a running ospreyd
    /// (osprey/{robot}/camera/{cam}/frame), at a fixed rate.
    Camera(crate::client::CameraArgs),
    /// Print every sample on a zenoh key expression (frames summarised).
    Watch(crate::client::WatchArgs),
    /// Ask the robot's onboard assistant; the answer streams as it is
    /// generated.
    Ask(crate::client::AskArgs),
    /// Show a running ospreyd's health and metrics as a table.
    Status(crate::client::StatusArgs),
}

/// Where the model comes from (shared by the model subcommands).
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// ONNX model file (imported and optimised now).
    #[arg(
        long,
        value_name = "M.onnx",
        conflicts_with = "engine",
        required_unless_present = "engine"
    )]
    pub onnx: Option<PathBuf>,
    /// Engine file written by `osprey build` (starts instantly; must have
    /// been built on this kind of device).
    #[arg(long, value_name = "M.engine")]
    pub engine: Option<PathBuf>,
    /// Shape for an input with dynamic dimensions, e.g. `x=1,3,640,640` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME=D0,D1,...")]
    pub input_shapes: Vec<String>,
    /// Worker threads (the caller included). Default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run the graph exactly as imported, without fusion passes (BatchNorm
    /// folding, conv epilogue fusion); for debugging and comparisons.
    #[arg(long)]
    pub no_optimize: bool,
}

/// `osprey run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// An input tensor, `NAME=FILE.npy` (float32), one per model input.
    #[arg(long = "input", value_name = "NAME=FILE.npy", required = true)]
    pub inputs: Vec<String>,
    /// Directory for the outputs (created if missing).
    #[arg(long = "output-dir", value_name = "DIR")]
    pub output_dir: PathBuf,
}

/// `osprey bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Timed inferences.
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Untimed inferences first (caches, page faults, thread wake-up).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Print exactly one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also time every kernel step and print where the time goes: each
    /// step's median over the iterations (a shared, noisy machine inflates
    /// means), with the mean beside it. Adds a little overhead per step;
    /// `--json` includes it as "profile" ("ms" is the median, "mean_ms"
    /// the mean, "share" the step's part of the sum of medians).
    #[arg(long)]
    pub profile: bool,
}

/// `osprey build`.
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// ONNX model file.
    #[arg(long, value_name = "M.onnx")]
    pub onnx: PathBuf,
    /// Engine file to write.
    #[arg(long, value_name = "M.engine")]
    pub out: PathBuf,
    /// Precision: fp16 halves the weights in the file (compute stays f32);
    /// int8 runs calibrated convolutions in INT8 (needs --calib).
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: PrecisionArg,
    /// Timing cache to read and update (created if missing): makes rebuilds fast.
    #[arg(long = "timing-cache", value_name = "FILE")]
    pub timing_cache: Option<PathBuf>,
    /// Threads the engine will run with (tactics are timed with them).
    /// Default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Shape for an input with dynamic dimensions, e.g. `x=1,3,640,640`.
    #[arg(long = "input-shape", value_name = "NAME=D0,D1,...")]
    pub input_shapes: Vec<String>,
    /// Print the build report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Internal tensor layout. `nchw` is ONNX's. `nhwc` runs convolutions,
    /// element-wise ops, global pooling and concatenations channels-last, with
    /// layout conversions only where that region meets the rest of the graph
    /// (inputs and outputs keep their NCHW shapes). `auto` builds and times
    /// both and keeps the faster (INT8 engines too: their channels-last
    /// layers run the channels-last INT8 kernels).
    #[arg(long, value_enum, default_value = "auto")]
    pub layout: LayoutArg,
    /// INT8: calibration cache, evaluation data, fallback and budget.
    #[command(flatten, next_help_heading = "INT8 (--precision int8)")]
    pub int8: crate::int8::Int8Args,
}

/// Weight precision of an engine.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    /// 32-bit float weights.
    Fp32,
    /// 16-bit float weights.
    Fp16,
    /// INT8 convolutions from a calibration cache (--calib), FP32 elsewhere.
    Int8,
}

/// Internal tensor layout of an engine.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutArg {
    /// Time NCHW and channels-last, keep the faster (NCHW for INT8).
    Auto,
    /// ONNX's layout throughout.
    Nchw,
    /// Channels-last wherever the kernels allow it.
    Nhwc,
}

/// `osprey inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command line.
pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run(a),
        Command::Bench(a) => bench(a),
        Command::Inspect(a) => inspect(a),
        Command::Build(a) => crate::build::build(a),
        Command::Calibrate(a) => crate::calibrate::calibrate(a),
        Command::Doctor(a) => crate::doctor::doctor(a),
        Command::Detect(a) => crate::vision::detect(a),
        Command::Classify(a) => crate::vision::classify(a),
        Command::Chat(a) => crate::chat::chat(a),
        Command::Tokenize(a) => crate::chat::tokenize(a),
        Command::Camera(a) => crate::client::camera(a),
        Command::Watch(a) => crate::client::watch(a),
        Command::Ask(a) => crate::client::ask(a),
        Command::Status(a) => crate::client::status(a),
    }
}

/// Number of cores, the default thread count.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Parses repeated `NAME=D0,D1,...` flags.
pub fn parse_shapes(specs: &[String]) -> Result<InputShapes> {
    let mut out = HashMap::new();
    for s in specs {
        let (name, dims) = s
            .split_once('=')
            .with_context(|| format!("--input-shape {s:?}: expected NAME=D0,D1,..."))?;
        let dims: Vec<usize> = dims
            .split(',')
            .map(|d| d.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| {
                format!("--input-shape {s:?}: dimensions must be positive integers")
            })?;
        if dims.contains(&0) {
            bail!("--input-shape {s:?}: dimensions must be positive");
        }
        out.insert(name.to_string(), dims);
    }
    Ok(out)
}

/// The model's display name (its path).
pub fn model_name(model: &ModelArgs) -> String {
    model
        .onnx
        .as_ref()
        .or(model.engine.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Loads `--engine` or imports (and optimises) `--onnx`; `extra_shapes`
/// fixes dynamic input dimensions (checked against an engine's own).
pub fn load_engine(model: &ModelArgs, extra_shapes: InputShapes) -> Result<Arc<Engine>> {
    if let Some(path) = &model.engine {
        if !model.input_shapes.is_empty() {
            bail!("--input-shape does not apply to an engine: its shapes were fixed by `osprey build`");
        }
        let ef = osprey_engine::file::load(
            path,
            Some(&osprey_engine::fingerprint::Fingerprint::current()),
        )?;
        for (name, shape) in &extra_shapes {
            if let Some(&t) = ef
                .graph
                .inputs
                .iter()
                .find(|&&t| &ef.graph.tensors[t].name == name)
            {
                let want = &ef.graph.tensors[t].shape;
                if want != shape {
                    bail!("input '{name}': got shape {shape:?}, the engine was built for {want:?}");
                }
            }
        }
        let engine = Engine::with_tactics(ef.graph, &ef.tactics)
            .with_context(|| path.display().to_string())?;
        return Ok(Arc::new(engine));
    }
    let Some(onnx) = &model.onnx else {
        bail!("give --onnx or --engine")
    };
    let mut shapes = parse_shapes(&model.input_shapes)?;
    for (k, v) in extra_shapes {
        shapes.entry(k).or_insert(v);
    }
    let mut graph = import_file(onnx, &shapes).map_err(|e| with_model_context(e, onnx))?;
    if !model.no_optimize {
        osprey_engine::passes::optimize(&mut graph);
    }
    let engine = Engine::new(graph).map_err(|e| with_model_context(e, onnx))?;
    Ok(Arc::new(engine))
}

/// Prefixes the model path, unless the error already names a file.
pub fn with_model_context(e: osprey_engine::EngineError, path: &Path) -> anyhow::Error {
    match e {
        osprey_engine::EngineError::Io { .. } | osprey_engine::EngineError::EngineFile { .. } => {
            e.into()
        }
        other => anyhow::Error::from(other).context(path.display().to_string()),
    }
}

/// `--threads`, or all cores.
pub fn threads(model: &ModelArgs) -> Result<usize> {
    match model.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(default_threads()),
    }
}

/// `NAME` → a file name: every character outside `[A-Za-z0-9_.-]` becomes `_`.
pub fn sanitize(name: &str) -> String {
    npy::sanitize_name(name)
}

fn run(a: RunArgs) -> Result<()> {
    let mut arrays = Vec::new();
    let mut shapes = HashMap::new();
    for spec in &a.inputs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input {spec:?}: expected NAME=FILE.npy"))?;
        let arr = npy::read(Path::new(file), false).with_context(|| format!("input '{name}'"))?;
        shapes.insert(name.to_string(), arr.shape.clone());
        arrays.push((name.to_string(), arr));
    }
    let engine = load_engine(&a.model, shapes)?;
    for d in engine.inputs() {
        if !arrays.iter().any(|(n, _)| n == &d.name) {
            bail!(
                "input '{}' {:?} not given; pass --input {}=FILE.npy",
                d.name,
                d.shape,
                d.name
            );
        }
    }
    let mut ctx = ExecutionContext::new(engine.clone(), threads(&a.model)?);
    for (name, arr) in &arrays {
        ctx.set_input(name, &arr.data)?;
    }
    ctx.run()?;
    std::fs::create_dir_all(&a.output_dir)
        .with_context(|| format!("creating {}", a.output_dir.display()))?;
    for (i, d) in engine.outputs().enumerate() {
        let data = ctx.output_index(i).context("output missing")?;
        let path = a.output_dir.join(format!("{}.npy", sanitize(&d.name)));
        npy::write(&path, &d.shape, data)?;
        eprintln!("wrote {} {:?}", path.display(), d.shape);
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let engine = load_engine(&a.model, HashMap::new())?;
    let threads = threads(&a.model)?;
    let mut ctx = ExecutionContext::new(engine.clone(), threads);
    let inputs: Vec<(String, Vec<f32>)> = engine
        .inputs()
        .enumerate()
        .map(|(i, d)| {
            (
                d.name.clone(),
                osprey_engine::tune::pseudo_random(d.numel(), 0x9e37_79b9 + i as u64),
            )
        })
        .collect();
    for (name, data) in &inputs {
        ctx.set_input(name, data)?;
    }
    for _ in 0..a.warmup {
        ctx.run()?;
    }
    let mut samples = Vec::with_capacity(a.iterations);
    let wall = Instant::now();
    for _ in 0..a.iterations {
        let t = Instant::now();
        ctx.run()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total_s = wall.elapsed().as_secs_f64();
    let lat = LatencySummary::from_samples(&samples);
    let profile = if a.profile {
        // Every step's time in every iteration (`iterations` rows), so
        // each step gets a median.
        let steps = engine.step_count();
        let mut secs = vec![0.0; steps * a.iterations];
        for row in secs.chunks_exact_mut(steps.max(1)) {
            ctx.run_profiled(row)?;
        }
        Some(profile_rows(&engine, &secs, a.iterations))
    } else {
        None
    };
    let throughput = a.iterations as f64 / total_s;
    let plan = engine.memory_plan();
    let isa = osprey_kernels::isa::active().name();
    if a.json {
        let v = json!({
            "model": model_name(&a.model),
            "latency_ms": lat,
            "throughput_per_s": throughput,
            "arena_bytes": plan.arena_bytes(),
            "naive_bytes": plan.naive_bytes(),
            "threads": ctx.threads(),
            "iterations": a.iterations,
            "warmup": a.warmup,
            "isa": isa,
            "steps": engine.step_count(),
            "profile": profile.as_ref().map(|rows| rows.iter().map(|r| json!({
                "step": r.name, "kernel": r.kernel, "ms": r.median_ms,
                "mean_ms": r.mean_ms, "share": r.share
            })).collect::<Vec<_>>()),
        });
        println!("{v}");
    } else {
        println!("model       {}", model_name(&a.model));
        println!("threads     {} ({isa})", ctx.threads());
        println!("iterations  {} (+{} warm-up)", a.iterations, a.warmup);
        println!(
            "latency ms  min {:.3}  mean {:.3}  median {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            lat.min, lat.mean, lat.median, lat.p90, lat.p99, lat.max
        );
        println!("throughput  {throughput:.1} inferences/s");
        println!(
            "arena       {} (naive {}, {:.0}% saved)",
            human_bytes(plan.arena_bytes()),
            human_bytes(plan.naive_bytes()),
            saved(plan.arena_bytes(), plan.naive_bytes())
        );
        if let Some(rows) = &profile {
            println!("profile     per-step median ms (mean), slowest first (by kernel kind below)");
            for r in rows.iter().take(15) {
                println!(
                    "  {:8.3} ms ({:7.3}) {:5.1}%  {:<48} {}",
                    r.median_ms,
                    r.mean_ms,
                    r.share * 100.0,
                    r.kernel,
                    r.name
                );
            }
            let mut by_kind: std::collections::BTreeMap<String, f64> = Default::default();
            for r in rows {
                let (kernel, ms) = (&r.kernel, r.median_ms);
                let kind = kernel.split(" @").next().unwrap_or(kernel);
                let kind = kind
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                *by_kind.entry(kind).or_default() += ms;
            }
            let total: f64 = by_kind.values().sum();
            let mut kinds: Vec<_> = by_kind.into_iter().collect();
            kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (k, ms) in kinds {
                println!(
                    "  {ms:8.3} ms {:5.1}%  [{k}]",
                    100.0 * ms / total.max(1e-12)
                );
            }
        }
    }
    Ok(())
}

/// One step of `osprey bench --profile`.
struct ProfileRow {
    name: String,
    kernel: String,
    median_ms: f64,
    mean_ms: f64,
    /// Part of the sum of all steps' medians.
    share: f64,
}

/// Rows of the profile from `secs` (`iterations` rows of one time per
/// step), slowest median first.
fn profile_rows(engine: &Engine, secs: &[f64], iterations: usize) -> Vec<ProfileRow> {
    let steps = engine.step_count();
    let mut times = Vec::with_capacity(iterations);
    let mut rows: Vec<ProfileRow> = (0..steps)
        .filter_map(|i| {
            let (name, kernel) = engine.step_info(i)?;
            times.clear();
            times.extend(secs.iter().skip(i).step_by(steps).map(|s| s * 1e3));
            let t = LatencySummary::from_samples(&times);
            Some(ProfileRow {
                name,
                kernel,
                median_ms: t.median,
                mean_ms: t.mean,
                share: 0.0,
            })
        })
        .collect();
    let total = rows.iter().map(|r| r.median_ms).sum::<f64>().max(1e-12);
    for r in &mut rows {
        r.share = r.median_ms / total;
    }
    rows.sort_by(|a, b| b.median_ms.total_cmp(&a.median_ms));
    rows
}

fn saved(arena: usize, naive: usize) -> f64 {
    if naive == 0 {
        0.0
    } else {
        100.0 * (1.0 - arena as f64 / naive as f64)
    }
}

/// `1234567` → `1.18 MiB`.
pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn inspect(a: InspectArgs) -> Result<()> {
    let engine = load_engine(&a.model, HashMap::new())?;
    let plan = engine.memory_plan();
    let ins: Vec<_> = engine
        .inputs()
        .map(|d| json!({"name": d.name, "shape": d.shape, "dtype": "float32"}))
        .collect();
    let outs: Vec<_> = engine
        .outputs()
        .map(|d| json!({"name": d.name, "shape": d.shape, "dtype": "float32"}))
        .collect();
    if a.json {
        println!(
            "{}",
            json!({
                "model": model_name(&a.model),
                "inputs": ins,
                "outputs": outs,
                "ops": engine.op_histogram(),
                "nodes": engine.node_count(),
                "steps": engine.step_count(),
                "constant_bytes": engine.constant_bytes(),
                "arena_bytes": plan.arena_bytes(),
                "naive_bytes": plan.naive_bytes(),
                "int8_convolutions": engine.int8_convolutions().0,
                "convolutions": engine.int8_convolutions().1,
                "int8_tensors": engine.int8_tensors(),
            })
        );
        return Ok(());
    }
    println!("model   {}", model_name(&a.model));
    println!("inputs");
    for d in engine.inputs() {
        println!("  {:<32} float32 {:?}", d.name, d.shape);
    }
    println!("outputs");
    for d in engine.outputs() {
        println!("  {:<32} float32 {:?}", d.name, d.shape);
    }
    println!(
        "operators ({} nodes after constant folding, {} kernel steps)",
        engine.node_count(),
        engine.step_count()
    );
    let mut ops: Vec<_> = engine.op_histogram().iter().collect();
    ops.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
    for (op, n) in ops {
        println!("  {op:<24} {n:>5}");
    }
    let (int8, convs) = engine.int8_convolutions();
    if int8 > 0 {
        println!(
            "int8    {int8} of {convs} convolutions run INT8; {} tensors pass between them as INT8",
            engine.int8_tensors()
        );
    }
    println!("weights {}", human_bytes(engine.constant_bytes()));
    println!(
        "arena   {} (naive {}, {:.0}% saved by lifetime reuse)",
        human_bytes(plan.arena_bytes()),
        human_bytes(plan.naive_bytes()),
        saved(plan.arena_bytes(), plan.naive_bytes())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_names() {
        assert_eq!(sanitize("tower_0/keypoints"), "tower_0_keypoints");
        assert_eq!(
            sanitize("save_infer_model/scale_0.tmp_1"),
            "save_infer_model_scale_0.tmp_1"
        );
        assert_eq!(sanitize("a b:c"), "a_b_c");
    }

    #[test]
    fn shape_specs() {
        let s = parse_shapes(&["x=1,3,640,640".into()]).unwrap();
        assert_eq!(s["x"], vec![1, 3, 640, 640]);
        assert!(parse_shapes(&["x".into()]).is_err());
        assert!(parse_shapes(&["x=1,a".into()]).is_err());
        assert!(parse_shapes(&["x=1,0".into()]).is_err());
    }

    #[test]
    fn bench_data_is_bounded_and_deterministic() {
        let a = osprey_engine::tune::pseudo_random(1000, 7);
        assert_eq!(a, osprey_engine::tune::pseudo_random(1000, 7));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
