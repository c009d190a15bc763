//! `ospreyd --demo`: the whole product on one machine. An embedded zenoh
//! peer, the bundled CenterNet detector, the assistant LLM from the
//! project's cache, and an internal camera replaying a folder of images
//! through the real topics. Every detections message is printed as one
//! JSON line; one question goes through the real queryable; a summary line
//! ends the run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use osprey_models::vision::packet::{self, Header};
use zenoh::Wait;

use crate::bus::{self, Bus, Keys};
use crate::config::{Config, ZenohConfig};
use crate::serve::Core;

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder of images the internal camera replays.
    pub images: Option<PathBuf>,
    /// Seconds of camera frames.
    pub duration: f64,
    /// Camera rate.
    pub fps: f64,
    /// Perception deadline.
    pub deadline_ms: u64,
    /// The question asked.
    pub question: String,
    /// Run without the assistant.
    pub no_assistant: bool,
    /// Ask again each time an answer ends, for the whole run.
    pub keep_asking: bool,
    /// Another perception model instead of the bundled CenterNet:
    /// (ONNX file, model description).
    pub model: Option<(PathBuf, PathBuf)>,
}

/// The bundled models: `$OSPREY_ZOO`, `./models/zoo`, next to the binary
/// in a source checkout, or the Debian package's `/usr/share/osprey/models`.
pub fn find_zoo() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Some(z) = std::env::var_os("OSPREY_ZOO") {
        c.push(z.into());
    }
    c.push("models/zoo".into());
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            c.push(up.join("models/zoo"));
        }
    }
    c.push("/usr/share/osprey/models".into());
    c.into_iter()
        .find(|d| d.join("centernet_mbv3_coco_512.toml").is_file())
        .and_then(|d| d.canonicalize().ok())
}

/// The assistant model fetched by `scripts/fetch-llm.sh`.
pub fn cached_llm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OSPREY_LLM") {
        return Some(p.into());
    }
    // Where scripts/fetch-llm.sh puts it.
    let cache = match (
        std::env::var_os("OSPREY_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
    ) {
        (Some(c), _) => PathBuf::from(c),
        (None, Some(x)) => Path::new(&x).join("osprey"),
        (None, None) => Path::new(&std::env::var_os("HOME")?).join(".cache/osprey"),
    };
    let p = cache.join("llm/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.is_file().then_some(p)
}

fn demo_config(zoo: &Path, opts: &DemoOptions, llm: Option<&Path>) -> Result<Config> {
    let (onnx, desc) = match &opts.model {
        Some((m, d)) => (m.canonicalize()?, d.canonicalize()?),
        None => {
            let onnx = zoo.join("centernet_mbv3_coco_512.onnx");
            let onnx = if onnx.is_file() {
                onnx
            } else {
                // The Debian package ships the description; the model may
                // live in the state directory.
                PathBuf::from("/var/lib/osprey/centernet_mbv3_coco_512.onnx")
            };
            (onnx, zoo.join("centernet_mbv3_coco_512.toml"))
        }
    };
    let name: String = desc
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let assistant = match llm {
        Some(p) => format!(
            "[assistant]\nmodel = {:?}\nkv_budget_bytes = 67108864\nmax_concurrent = 2\nmax_prompt_tokens = 256\nmax_answer_tokens = 96\nlane = \"assistant\"\n",
            p.display().to_string()
        ),
        None => String::new(),
    };
    let text = format!(
        r#"robot = "demo"
[zenoh]
mode = "peer"
listen = ["tcp/127.0.0.1:0"]
[[models]]
name = "{name}"
onnx = {onnx:?}
model_desc = {desc:?}
cameras = ["front"]
deadline_ms = {deadline}
lane = "perception"
fps = {fps}
{assistant}
[pools]
max_frame_bytes = 12582912
frame_bytes = 268435456
lock_memory = false
[[scheduler.lanes]]
name = "perception"
cpu_workers = 1
[[scheduler.lanes]]
name = "assistant"
cpu_workers = 1
"#,
        onnx = onnx.display().to_string(),
        desc = desc.display().to_string(),
        deadline = opts.deadline_ms,
        fps = opts.fps,
    );
    Ok(Config::parse(&text, &zoo.join("demo.toml"))?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// One question through the queryable: the answer, time to first text,
/// decode rate.
fn ask(
    session: &zenoh::Session,
    keys: &Keys,
    question: &str,
    duration: Duration,
) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let replies = session
        .get(keys.ask())
        .payload(question.to_string())
        .consolidation(zenoh::query::ConsolidationMode::None)
        .timeout(duration + Duration::from_secs(120))
        .wait()
        .map_err(|e| anyhow!("zenoh: {e}"))?;
    let mut answer = String::new();
    let mut ttft = None;
    let mut tok_s = 0.0;
    while let Ok(r) = replies.recv() {
        let Ok(sample) = r.result() else { continue };
        let v: serde_json::Value =
            serde_json::from_slice(&sample.payload().to_bytes()).unwrap_or_default();
        if let Some(e) = v["error"].as_str() {
            tracing::warn!("assistant: {e}");
        }
        if let Some(t) = v["text"].as_str().filter(|t| !t.is_empty()) {
            ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
            answer.push_str(t);
        }
        if v["done"] == true {
            tok_s = v["decode_tok_s"].as_f64().unwrap_or(0.0);
        }
    }
    Ok(serde_json::json!({
        "question": question,
        "answer": answer,
        "ttft_ms": ttft.unwrap_or(0.0),
        "decode_tok_s": tok_s,
    }))
}

fn core_names(cfg: &Config) -> Vec<String> {
    cfg.models
        .iter()
        .map(|m| m.output_name().to_string())
        .collect()
}

/// Runs the demo; prints JSON lines on stdout.
pub fn run(opts: DemoOptions) -> Result<()> {
    if !(opts.fps > 0.0 && opts.fps <= 240.0) {
        bail!("--fps must be in (0, 240]");
    }
    if !(opts.duration.is_finite() && opts.duration > 0.0) {
        bail!("--duration must be above 0");
    }
    let zoo = find_zoo().context(
        "the bundled models (models/zoo/centernet_mbv3_coco_512.toml) were not found: run from the source checkout or set OSPREY_ZOO",
    )?;
    let images = match &opts.images {
        Some(d) => d.clone(),
        None => [
            PathBuf::from("../shared/fixtures/images"),
            zoo.join("../../../shared/fixtures/images"),
        ]
        .into_iter()
        .find(|d| d.is_dir())
        .context("no --images DIR given and ../shared/fixtures/images is not here")?,
    };
    let llm = if opts.no_assistant {
        None
    } else {
        let l = cached_llm();
        if l.is_none() {
            tracing::warn!(
                "the assistant model is not in ~/.cache/osprey/llm (run scripts/fetch-llm.sh): demo without the assistant"
            );
        }
        l
    };
    // Frames as a camera delivers them: NV12.
    let mut frames = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
        .with_context(|| images.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        })
        .collect();
    files.sort();
    for f in &files {
        match crate::client::payload(f, crate::client::CameraEncoding::Nv12) {
            Ok(frame) => frames.push(frame),
            Err(e) => tracing::warn!("skipped {e:#}"),
        }
    }
    if frames.is_empty() {
        bail!("{}: no readable JPEG/PNG images", images.display());
    }
    let cfg = demo_config(&zoo, &opts, llm.as_deref())?;
    let keys = Keys::new(&cfg.robot);
    let session = bus::open(&ZenohConfig {
        multicast_scouting: false,
        ..cfg.zenoh.clone()
    })?;
    let outputs = bus::outputs(&session, &keys, &core_names(&cfg))?;
    let (core, report) = Core::start(cfg, outputs)?;
    for w in &report.warnings {
        tracing::warn!("admission: {w}");
    }
    tracing::info!(
        "demo: {} {:.1} ms per frame at warm-up; {} image(s) from {} at {} fps for {} s",
        core.model_names().join(","),
        report.latency_ms.first().copied().unwrap_or(0.0),
        frames.len(),
        images.display(),
        opts.fps,
        opts.duration
    );
    let bus = Bus::declare(&session, core.clone())?;

    // Per message: capture to receipt here, queue wait, pipeline
    // (preprocess + infer + decode); the overhead (daemon and transport)
    // is what is left.
    let latencies = Arc::new(Mutex::new(Vec::<(f64, f64, f64)>::new()));
    let l = latencies.clone();
    let printed = Arc::new(AtomicU64::new(0));
    let pr = printed.clone();
    let _sub = session
        .declare_subscriber(keys.detections("*"))
        .callback(move |sample| {
            let bytes = sample.payload().to_bytes();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                let lm = &v["latency_ms"];
                // Frame in (capture) to detections out (here, at a
                // subscriber): includes zenoh's delivery both ways.
                let delivered = v["capture_ns"]
                    .as_u64()
                    .map(|c| packet::now_ns().saturating_sub(c) as f64 / 1e6);
                if let (Some(e), Some(q), Some(t)) =
                    (delivered, lm["queue"].as_f64(), lm["total"].as_f64())
                {
                    if let Ok(mut l) = l.lock() {
                        l.push((e, q, t));
                    }
                }
            }
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&bytes);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
            pr.fetch_add(1, Ordering::Relaxed);
        })
        .wait()
        .map_err(|e| anyhow!("zenoh: {e}"))?;

    // The internal camera.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publisher = session
        .declare_publisher(keys.camera("front"))
        .wait()
        .map_err(|e| anyhow!("zenoh: {e}"))?;
    let (s, n) = (stop.clone(), sent.clone());
    let period = Duration::from_secs_f64(1.0 / opts.fps);
    let duration = Duration::from_secs_f64(opts.duration);
    let camera = std::thread::spawn(move || {
        let start = Instant::now();
        let mut buf = Vec::new();
        let mut seq = 0u64;
        while start.elapsed() < duration && !s.load(Ordering::Relaxed) {
            let (encoding, w, h, px) = &frames[(seq as usize) % frames.len()];
            let header = Header {
                encoding: *encoding,
                width: *w,
                height: *h,
                stride: 0,
                capture_ns: packet::now_ns(),
                seq,
            };
            packet::write(&header, px, &mut buf);
            if publisher.put(buf.clone()).wait().is_ok() {
                n.fetch_add(1, Ordering::Relaxed);
            }
            seq += 1;
            if let Some(d) =
                (start + period.mul_f64(seq as f64)).checked_duration_since(Instant::now())
            {
                std::thread::sleep(d);
            }
        }
    });

    // One question through the real queryable, while the camera runs.
    let assistant = if llm.is_some() {
        std::thread::sleep(Duration::from_millis(500));
        let first = ask(&session, &keys, &opts.question, duration)?;
        // --keep-asking: the assistant streams for the whole run.
        let mut answers = 1u64;
        while opts.keep_asking && !camera.is_finished() {
            ask(&session, &keys, &opts.question, duration)?;
            answers += 1;
        }
        let mut v = first;
        v["answers"] = answers.into();
        Some(v)
    } else {
        None
    };
    let _ = camera.join();
    stop.store(true, Ordering::Relaxed);
    // The last frames' detections.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        let m = &core.metrics().models[0];
        let settled = m.processed.load(Ordering::Relaxed)
            + m.dropped.load(Ordering::Relaxed)
            + m.expired.load(Ordering::Relaxed)
            + m.errors.load(Ordering::Relaxed);
        if settled >= m.received.load(Ordering::Relaxed)
            && printed.load(Ordering::Relaxed) >= m.processed.load(Ordering::Relaxed)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    core.drain(Duration::from_secs(5));
    drop(bus);
    let m = &core.metrics().models[0];
    let all = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let sorted = |f: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = all.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (lat, queue, pipeline) = (sorted(|x| x.0), sorted(|x| x.1), sorted(|x| x.2));
    let over = sorted(|x| x.0 - x.1 - x.2);
    let stats = |v: &[f64]| {
        serde_json::json!({
            "p50": percentile(v, 0.5),
            "p99": percentile(v, 0.99),
            "max": v.last().copied().unwrap_or(0.0),
        })
    };
    let summary = serde_json::json!({"summary": {
        "frames": sent.load(Ordering::Relaxed),
        "detections_published": m.processed.load(Ordering::Relaxed),
        "deadline_misses": m.deadline_misses.load(Ordering::Relaxed),
        "dropped_frames": m.dropped.load(Ordering::Relaxed),
        "latency_ms": stats(&lat),
        "queue_ms": stats(&queue),
        "overhead_ms": stats(&over),
        "pipeline_ms": stats(&pipeline),
        "assistant": assistant,
    }});
    println!("{summary}");
    let _ = session.close().wait();
    Ok(())
}
