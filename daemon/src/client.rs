//! Client commands that talk to a running `ospreyd` over zenoh:
//! `osprey camera`, `osprey watch`, `osprey ask`, `osprey status`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use osprey_models::vision::packet::{self, Encoding, Header};
use osprey_models::vision::{encode_rgb, read_image, FrameLimits, PixelFormat, YuvMatrix};
use zenoh::Wait;

use crate::bus::{open_client, Keys};

/// Where the daemon is.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Zenoh endpoint of the daemon or a router, e.g. tcp/192.168.1.20:7447
    /// (repeatable). Without it, peers are found by multicast scouting.
    #[arg(long, value_name = "ENDPOINT")]
    pub connect: Vec<String>,
    /// Robot name (the `robot` of ospreyd.toml).
    #[arg(long, env = "OSPREY_ROBOT", value_name = "NAME")]
    pub robot: String,
}

/// Frame encodings `osprey camera` can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CameraEncoding {
    /// Raw RGB8 pixels.
    RawRgb,
    /// NV12 (BT.601 limited range), as most camera pipelines deliver.
    Nv12,
    /// The JPEG file as it is (PNG files are re-sent as PNG).
    Jpeg,
}

/// `osprey camera`.
#[derive(Args, Debug)]
pub struct CameraArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Folder of JPEG/PNG images, sent in name order.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "image",
        required_unless_present = "image"
    )]
    pub images: Option<PathBuf>,
    /// One image, sent repeatedly.
    #[arg(long, value_name = "F")]
    pub image: Option<PathBuf>,
    /// Frames per second.
    #[arg(long, default_value_t = 10.0)]
    pub fps: f64,
    /// Camera name: the `{cam}` of osprey/{robot}/camera/{cam}/frame.
    #[arg(long, default_value = "front")]
    pub cam: String,
    /// Payload encoding.
    #[arg(long, value_enum, default_value = "raw-rgb")]
    pub encoding: CameraEncoding,
    /// Frames to send (default: each image once; with --image, 100).
    #[arg(long)]
    pub count: Option<u64>,
    /// Copy frames through the network stack even on the same host
    /// (default: zenoh shared memory where the subscriber is local).
    #[arg(long)]
    pub no_shm: bool,
}

/// `osprey watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Key expression, e.g. 'osprey/rover1/perception/*/detections'; a
    /// relative one (no leading osprey/) is taken under osprey/{robot}/.
    pub key_expr: String,
    /// Stop after this many samples.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
}

/// `osprey ask`.
#[derive(Args, Debug)]
pub struct AskArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The question.
    pub text: String,
    /// Seconds to wait for the whole answer.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Print each reply as the daemon sent it (JSON lines).
    #[arg(long)]
    pub json: bool,
}

/// `osprey status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print {health, metrics} as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the daemon.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
}

fn session(c: &ClientArgs) -> Result<zenoh::Session> {
    let s = open_client(&c.connect)?;
    if !c.connect.is_empty() {
        // Give the connection a moment before the first declaration.
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(s)
}

fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let out = osprey_calibration::dataset::files_with(dir, &["jpg", "jpeg", "png"])?;
    if out.is_empty() {
        bail!("{}: no .jpg/.jpeg/.png images", dir.display());
    }
    Ok(out)
}

/// One image as a packet payload: header fields and bytes.
pub(crate) fn payload(path: &Path, enc: CameraEncoding) -> Result<(Encoding, u32, u32, Vec<u8>)> {
    let limits = FrameLimits::default();
    let img = read_image(path, &limits).with_context(|| path.display().to_string())?;
    let (w, h) = (img.width as u32, img.height as u32);
    Ok(match enc {
        CameraEncoding::RawRgb => (Encoding::Raw(PixelFormat::Rgb8), w, h, img.data),
        CameraEncoding::Nv12 => (
            Encoding::Raw(PixelFormat::Nv12),
            w,
            h,
            encode_rgb(&img, PixelFormat::Nv12, YuvMatrix::Bt601Limited),
        ),
        CameraEncoding::Jpeg => {
            let bytes = std::fs::read(path)?;
            let e = if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
                Encoding::Png
            } else {
                Encoding::Jpeg
            };
            (e, w, h, bytes)
        }
    })
}

/// `osprey camera`: publishes frames at a fixed rate.
pub fn camera(a: CameraArgs) -> Result<()> {
    if !(a.fps > 0.0 && a.fps <= 1000.0) {
        bail!("--fps must be in (0, 1000]");
    }
    let files = match (&a.images, &a.image) {
        (Some(d), _) => image_files(d)?,
        (None, Some(f)) => vec![f.clone()],
        (None, None) => bail!("give --images DIR or --image F"),
    };
    let frames: Vec<_> = files
        .iter()
        .map(|f| payload(f, a.encoding))
        .collect::<Result<_>>()?;
    let count = a.count.unwrap_or(if a.image.is_some() {
        100
    } else {
        frames.len() as u64
    });
    let s = session(&a.client)?;
    let keys = Keys::new(&a.client.robot);
    let key = keys.camera(&a.cam);
    let publisher = s
        .declare_publisher(key.clone())
        .wait()
        .map_err(|e| anyhow!("{e}"))?;
    let largest = frames.iter().map(|f| f.3.len()).max().unwrap_or(0) + packet::HEADER_LEN;
    let shm = if a.no_shm {
        None
    } else {
        zenoh::shm::ShmProviderBuilder::default_backend(largest * 4)
            .wait()
            .ok()
    };
    eprintln!(
        "publishing {count} frame(s) at {} fps on {key} ({:?}{})",
        a.fps,
        a.encoding,
        if shm.is_some() { ", shared memory" } else { "" }
    );
    let period = Duration::from_secs_f64(1.0 / a.fps);
    let start = Instant::now();
    let mut packet_buf = Vec::with_capacity(largest);
    for seq in 0..count {
        let due = start + period.mul_f64(seq as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (encoding, width, height, bytes) = &frames[(seq as usize) % frames.len()];
        let header = Header {
            encoding: *encoding,
            width: *width,
            height: *height,
            stride: 0,
            capture_ns: packet::now_ns(),
            seq,
        };
        packet::write(&header, bytes, &mut packet_buf);
        let sent = match &shm {
            Some(p) => match p
                .alloc(packet_buf.len())
                .with_policy::<zenoh::shm::BlockOn<zenoh::shm::GarbageCollect>>()
                .wait()
            {
                Ok(mut sbuf) => {
                    sbuf.copy_from_slice(&packet_buf);
                    publisher.put(sbuf).wait()
                }
                Err(_) => publisher.put(packet_buf.clone()).wait(),
            },
            None => publisher.put(packet_buf.clone()).wait(),
        };
        sent.map_err(|e| anyhow!("publishing frame {seq}: {e}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "sent {count} frame(s) in {secs:.2} s ({:.1} fps)",
        count as f64 / secs.max(1e-9)
    );
    // Let the last frames leave before the session closes.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn qualify(robot: &str, key: &str) -> String {
    if key.starts_with("osprey/") || key.starts_with("**") {
        key.to_string()
    } else {
        format!("osprey/{robot}/{key}")
    }
}

/// A sample's payload for a terminal: text as is, frame packets
/// summarised, other bytes counted.
fn show(bytes: &[u8]) -> String {
    if let Ok((h, p)) = packet::parse(bytes) {
        return format!(
            "frame #{} {}x{} {} ({} bytes), captured {:.1} ms ago",
            h.seq,
            h.width,
            h.height,
            h.encoding.name(),
            p.len(),
            (packet::now_ns().saturating_sub(h.capture_ns)) as f64 / 1e6
        );
    }
    match std::str::from_utf8(bytes) {
        Ok(t) => t.to_string(),
        Err(_) => format!("<{} bytes>", bytes.len()),
    }
}

/// `osprey watch`: prints each sample on a key expression.
pub fn watch(a: WatchArgs) -> Result<()> {
    let s = session(&a.client)?;
    let key = qualify(&a.client.robot, &a.key_expr);
    let sub = s
        .declare_subscriber(key.clone())
        .wait()
        .map_err(|e| anyhow!("{key}: {e}"))?;
    eprintln!("watching {key}");
    let until = a
        .timeout
        .map(|t| Instant::now() + Duration::from_secs_f64(t));
    let mut n = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        if a.count.is_some_and(|c| n >= c) {
            break;
        }
        let wait = match until {
            Some(u) => match u.checked_duration_since(Instant::now()) {
                Some(d) => d,
                None => break,
            },
            None => Duration::from_millis(500),
        };
        match sub.recv_timeout(wait) {
            Ok(Some(sample)) => {
                n += 1;
                let bytes = sample.payload().to_bytes();
                writeln!(out, "{} {}", sample.key_expr(), show(&bytes))?;
                out.flush()?;
            }
            Ok(None) => {}
            Err(e) => bail!("{e}"),
        }
    }
    Ok(())
}

/// `osprey ask`: streams the assistant's answer to stdout.
pub fn ask(a: AskArgs) -> Result<()> {
    let s = session(&a.client)?;
    let key = Keys::new(&a.client.robot).ask();
    let replies = s
        .get(key.clone())
        .payload(a.text.clone())
        .consolidation(zenoh::query::ConsolidationMode::None)
        .timeout(Duration::from_secs_f64(a.timeout.max(0.1)))
        .wait()
        .map_err(|e| anyhow!("{key}: {e}"))?;
    let mut out = std::io::stdout().lock();
    let mut got_any = false;
    let mut done = false;
    while let Ok(reply) = replies.recv() {
        got_any = true;
        let sample = match reply.result() {
            Ok(s) => s,
            Err(e) => bail!(
                "the daemon answered with an error: {}",
                show(&e.payload().to_bytes())
            ),
        };
        let bytes = sample.payload().to_bytes();
        if a.json {
            writeln!(out, "{}", String::from_utf8_lossy(&bytes))?;
            out.flush()?;
        }
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).context("the daemon sent a reply that is not JSON")?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            bail!("{e}");
        }
        if !a.json {
            if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
                write!(out, "{t}")?;
                out.flush()?;
            }
        }
        if v.get("done").and_then(|d| d.as_bool()) == Some(true) {
            done = true;
            if !a.json {
                writeln!(out)?;
                eprintln!(
                    "[{} tokens, first token after {:.0} ms, {:.1} tokens/s, stop: {}]",
                    v["generated_tokens"],
                    v["ttft_ms"].as_f64().unwrap_or(0.0),
                    v["decode_tok_s"].as_f64().unwrap_or(0.0),
                    v["stop"].as_str().unwrap_or("?")
                );
            }
        }
    }
    if !got_any {
        bail!(
            "no answer on {key} within {} s: is ospreyd running with an assistant for robot {:?}? (check with `osprey status`)",
            a.timeout,
            a.client.robot
        );
    }
    if !done {
        bail!(
            "the answer stopped before it finished (timeout {} s)",
            a.timeout
        );
    }
    Ok(())
}

fn get_json(s: &zenoh::Session, key: &str, timeout: Duration) -> Result<Option<serde_json::Value>> {
    let replies = s
        .get(key)
        .timeout(timeout)
        .wait()
        .map_err(|e| anyhow!("{key}: {e}"))?;
    while let Ok(r) = replies.recv() {
        if let Ok(sample) = r.result() {
            let v = serde_json::from_slice(&sample.payload().to_bytes())
                .with_context(|| format!("{key}: not JSON"))?;
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// `osprey status`: health and metrics as a table.
pub fn status(a: StatusArgs) -> Result<()> {
    let s = session(&a.client)?;
    let keys = Keys::new(&a.client.robot);
    let t = Duration::from_secs_f64(a.timeout.max(0.1));
    let alive = s
        .liveliness()
        .get(keys.health())
        .timeout(t)
        .wait()
        .map_err(|e| anyhow!("{e}"))?
        .recv()
        .is_ok();
    let health = get_json(&s, &keys.health(), t)?;
    let metrics = get_json(&s, &keys.metrics(), t)?;
    let (Some(health), Some(metrics)) = (health, metrics) else {
        bail!(
            "no ospreyd answered for robot {:?} within {} s{}",
            a.client.robot,
            a.timeout,
            if a.client.connect.is_empty() {
                " (no --connect: relying on multicast scouting)"
            } else {
                ""
            }
        );
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"alive": alive, "health": health, "metrics": metrics})
        );
        return Ok(());
    }
    print!("{}", status_table(alive, &health, &metrics));
    Ok(())
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The table `osprey status` prints.
pub fn status_table(
    alive: bool,
    health: &serde_json::Value,
    metrics: &serde_json::Value,
) -> String {
    let mut s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        s,
        "robot {}  state {}{}  up {} s  ospreyd {}",
        health["robot"].as_str().unwrap_or("?"),
        health["state"].as_str().unwrap_or("?"),
        if alive { "" } else { " (no liveliness token)" },
        health["uptime_s"],
        health["version"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "\n{:<16} {:<9} {:>8} {:>9} {:>8} {:>7} {:>6} {:>8} {:>8} {:>8}",
        "model",
        "state",
        "received",
        "processed",
        "dropped",
        "missed",
        "errors",
        "p50 ms",
        "p99 ms",
        "infer ms"
    );
    if let Some(models) = metrics["models"].as_object() {
        for (name, m) in models {
            let e2e = &m["latency_ms"]["end_to_end"];
            let _ = writeln!(
                s,
                "{:<16} {:<9} {:>8} {:>9} {:>8} {:>7} {:>6} {:>8.1} {:>8.1} {:>8.1}",
                name,
                health["models"][name]["state"].as_str().unwrap_or("?"),
                m["received"],
                m["processed"],
                m["dropped"],
                m["deadline_misses"],
                m["errors"],
                f(&e2e["p50_ms"]),
                f(&e2e["p99_ms"]),
                f(&m["latency_ms"]["infer"]["p50_ms"]),
            );
        }
    }
    let a = &metrics["assistant"];
    if !health["assistant"].is_null() {
        let _ = writeln!(
            s,
            "\nassistant  questions {}  rejected {}  active {}  waiting {}  tokens {}  step p50 {:.1} ms  first token p50 {:.0} ms",
            a["questions"],
            a["rejected"],
            a["active"],
            a["waiting"],
            a["tokens"],
            f(&a["latency_ms"]["step"]["p50_ms"]),
            f(&a["latency_ms"]["ttft"]["p50_ms"]),
        );
    }
    let p = &metrics["pools"];
    let mib = |v: &serde_json::Value| f(v) / (1 << 20) as f64;
    let _ = writeln!(
        s,
        "\npools  frames {:.1}/{:.1} MiB  engines {:.1}/{:.1} MiB  kv {:.1} MiB ({}/{} blocks used)",
        mib(&p["frame_bytes"]),
        mib(&p["frame_budget"]),
        mib(&p["arena_bytes"]),
        mib(&p["arena_budget"]),
        mib(&p["kv_bytes"]),
        p["kv_blocks_used"],
        p["kv_blocks_total"],
    );
    s
}
