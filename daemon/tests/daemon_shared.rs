//! ospreyd with the bundled CenterNet on loopback, driven through zenoh
//! directly: detections equal `osprey detect --json` on the same images;
//! malformed frames are counted and serving goes on; unknown model names
//! in queries get an error reply; a 5x overload drops frames, keeps memory
//! bounded and misses no deadline among the frames that ran.
//!
//! Needs ../shared/fixtures/images (skips visibly without it).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{now_ns, until, Spawned};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osprey_models::vision::packet::{self, Encoding, Header};
use osprey_models::vision::{read_image, FrameLimits, PixelFormat};
use zenoh::Wait;

const OSPREYD: &str = env!("CARGO_BIN_EXE_ospreyd");

/// The tests here measure latency and overload: one at a time, so they do
/// not load the machine for each other.
static SERIAL: Mutex<()> = Mutex::new(());
const OSPREY: &str = env!("CARGO_BIN_EXE_osprey");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn images() -> Option<Vec<PathBuf>> {
    let dir = root().join("../shared/fixtures/images");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("jpg" | "png")))
        .collect();
    v.sort();
    Some(v)
}

fn config(dir: &Path, endpoint: &str, deadline_ms: u64) -> String {
    let zoo = root().join("models/zoo");
    format!(
        r#"robot = "cn"
[zenoh]
listen = ["{endpoint}"]
[[models]]
name = "centernet"
onnx = "{}"
model_desc = "{}"
cameras = ["front"]
deadline_ms = {deadline_ms}
lane = "perception"
fps = 2
[pools]
max_frame_bytes = 4194304
lock_memory = false
[[scheduler.lanes]]
name = "perception"
cpu_workers = 1
"#,
        zoo.join("centernet_mbv3_coco_512.onnx").display(),
        zoo.join("centernet_mbv3_coco_512.toml").display(),
    )
    .replace("{dir}", &dir.display().to_string())
}

fn recv_prefix(sock: &UnixDatagram, prefix: &str) {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(120) {
        if let Ok(n) = sock.recv(&mut buf) {
            if buf[..n].starts_with(prefix.as_bytes()) {
                return;
            }
        }
    }
    panic!("no {prefix} from ospreyd");
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn rgb_packet(path: &Path, seq: u64) -> Vec<u8> {
    let img = read_image(path, &FrameLimits::default()).unwrap();
    let mut out = Vec::new();
    packet::write(
        &Header {
            encoding: Encoding::Raw(PixelFormat::Rgb8),
            width: img.width as u32,
            height: img.height as u32,
            stride: 0,
            capture_ns: now_ns(),
            seq,
        },
        &img.data,
        &mut out,
    );
    out
}

fn metrics(s: &zenoh::Session, sel: &str) -> Result<serde_json::Value, String> {
    let replies = s.get(sel).timeout(Duration::from_secs(10)).wait().unwrap();
    let r = replies.recv().map_err(|e| format!("no reply: {e}"))?;
    match r.result() {
        Ok(sample) => Ok(serde_json::from_slice(&sample.payload().to_bytes()).unwrap()),
        Err(e) => Err(String::from_utf8_lossy(&e.payload().to_bytes()).into_owned()),
    }
}

#[test]
fn centernet_over_zenoh_matches_osprey_detect_and_survives_overload() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(files) = images() else {
        eprintln!("SKIPPED: ../shared/fixtures/images is absent");
        return;
    };
    let dir = std::env::temp_dir().join(format!("ospreyd-cn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("tcp/127.0.0.1:{port}");
    let cfg_path = dir.join("ospreyd.toml");
    std::fs::write(&cfg_path, config(&dir, &endpoint, 5000)).unwrap();
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut daemon = Spawned(
        Command::new(OSPREYD)
            .args(["--config", cfg_path.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &sock_path)
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = daemon.0.id();
    recv_prefix(&sock, "READY=1");

    let session = osprey_daemon::bus::open_client(std::slice::from_ref(&endpoint)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let g = got.clone();
    let _sub = session
        .declare_subscriber("osprey/cn/perception/centernet/detections")
        .callback(move |s| {
            g.lock()
                .unwrap()
                .push(serde_json::from_slice(&s.payload().to_bytes()).unwrap());
        })
        .wait()
        .unwrap();
    let camera = session
        .declare_publisher("osprey/cn/camera/front/frame")
        .wait()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // 1. Each image: the daemon's detections equal `osprey detect`.
    let zoo = root().join("models/zoo");
    for (i, f) in files.iter().enumerate() {
        camera.put(rgb_packet(f, i as u64)).wait().unwrap();
        until(60, "detections of the image", || {
            got.lock().unwrap().len() > i
        });
        let daemon_json = got.lock().unwrap()[i].clone();
        assert_eq!(daemon_json["seq"], i as u64);
        let out = Command::new(OSPREY)
            .args(["detect", "--json", "--threads", "1"])
            .args([
                "--onnx",
                zoo.join("centernet_mbv3_coco_512.onnx").to_str().unwrap(),
            ])
            .args([
                "--model-desc",
                zoo.join("centernet_mbv3_coco_512.toml").to_str().unwrap(),
            ])
            .args(["--image", f.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (a, b) = (
            daemon_json["detections"].as_array().unwrap(),
            cli["detections"].as_array().unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{}: {a:?} vs {b:?}", f.display());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x["label"], y["label"]);
            let d = (x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs();
            assert!(d < 1e-5, "{}: score {x} vs {y}", f.display());
            for k in 0..4 {
                let d = (x["box"][k].as_f64().unwrap() - y["box"][k].as_f64().unwrap()).abs();
                assert!(d < 1e-3, "{}: box {x} vs {y}", f.display());
            }
        }
    }

    // 2. Malformed frames are counted; serving goes on.
    let good = rgb_packet(&files[0], 100);
    let mut wrong_magic = good.clone();
    wrong_magic[..4].copy_from_slice(b"JUNK");
    let mut huge = good[..packet::HEADER_LEN].to_vec();
    huge[8..12].copy_from_slice(&100_000u32.to_le_bytes());
    huge[12..16].copy_from_slice(&100_000u32.to_le_bytes());
    huge[20..24].copy_from_slice(&0u32.to_le_bytes());
    for bad in [&good[..1000], &wrong_magic[..], &huge[..]] {
        camera.put(bad.to_vec()).wait().unwrap();
    }
    // The huge frame fails in its job; wait for that before the next frame,
    // which would otherwise replace it in the latest-wins slot (a drop,
    // not an error).
    until(60, "three errors", || {
        metrics(&session, "osprey/cn/metrics")
            .is_ok_and(|m| m["models"]["centernet"]["errors"] == 3)
    });
    let n = got.lock().unwrap().len();
    camera.put(rgb_packet(&files[1], 101)).wait().unwrap();
    until(60, "a good frame after bad ones", || {
        got.lock().unwrap().len() > n
    });
    let m = metrics(&session, "osprey/cn/metrics").unwrap();
    assert_eq!(m["models"]["centernet"]["errors"], 3, "{m}");
    // Unknown model names in a query: an error reply.
    let e = metrics(&session, "osprey/cn/metrics?model=nope").unwrap_err();
    let e: serde_json::Value = serde_json::from_str(&e).unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("unknown model \"nope\""),
        "{e}"
    );
    let one = metrics(&session, "osprey/cn/health?model=centernet").unwrap();
    assert_eq!(one["models"]["centernet"]["state"], "serving");

    // 3. Overload at 5x the sustainable rate, with a deadline of 4x the
    // engine's latency (applied by SIGHUP).
    let infer = m["models"]["centernet"]["latency_ms"]["end_to_end"]["p50_ms"]
        .as_f64()
        .unwrap();
    let deadline = (infer * 4.0).max(200.0) as u64;
    std::fs::write(&cfg_path, config(&dir, &endpoint, deadline)).unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    recv_prefix(&sock, "READY=1");
    let before = metrics(&session, "osprey/cn/metrics").unwrap()["models"]["centernet"].clone();
    let rss0 = rss_kib(pid);
    let rate = 5.0 * 1000.0 / infer;
    let frames: Vec<Vec<u8>> = files
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, f)| rgb_packet(f, i as u64))
        .collect();
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < Duration::from_secs(4) {
        let mut p = frames[sent as usize % frames.len()].clone();
        // Fresh capture time and sequence.
        p[24..32].copy_from_slice(&now_ns().to_le_bytes());
        p[32..40].copy_from_slice(&(1000 + sent).to_le_bytes());
        camera.put(p).wait().unwrap();
        sent += 1;
        std::thread::sleep(Duration::from_secs_f64(1.0 / rate));
    }
    std::thread::sleep(Duration::from_millis(deadline + 500));
    let rss1 = rss_kib(pid);
    let after = metrics(&session, "osprey/cn/metrics").unwrap()["models"]["centernet"].clone();
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert!(sent >= 20, "sent {sent}");
    assert_eq!(d("received"), sent, "{after}");
    assert!(d("dropped") > 0, "a 5x overload drops frames: {after}");
    assert!(d("processed") > 0, "{after}");
    assert_eq!(
        d("late"),
        0,
        "a frame that ran finished after its deadline: {after}"
    );
    assert_eq!(
        d("received"),
        d("processed") + d("dropped") + d("expired"),
        "{after}"
    );
    assert!(
        rss1 < rss0 + 64 * 1024,
        "memory grew from {rss0} KiB to {rss1} KiB under overload"
    );
    eprintln!(
        "overload: {sent} frames at {rate:.0} fps, {} processed, {} dropped, {} expired, RSS {rss0} -> {rss1} KiB",
        d("processed"),
        d("dropped"),
        d("expired")
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = daemon.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_demo_prints_detections_and_a_summary() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if images().is_none() {
        eprintln!("SKIPPED: ../shared/fixtures/images is absent");
        return;
    }
    let out = Command::new(OSPREYD)
        .current_dir(root())
        .args([
            "--demo",
            "--duration",
            "3",
            "--fps",
            "4",
            "--deadline-ms",
            "1000",
        ])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect();
    let (summary, dets) = lines.split_last().unwrap();
    let s = &summary["summary"];
    assert_eq!(
        s["detections_published"].as_u64().unwrap() as usize,
        dets.len(),
        "{text}"
    );
    assert!(s["frames"].as_u64().unwrap() >= 10, "{s}");
    assert!(!dets.is_empty());
    for d in dets {
        assert_eq!(d["model"], "centernet_mbv3_coco_512");
    }
    let lat = &s["latency_ms"];
    assert!(lat["p50"].as_f64().unwrap() <= lat["p99"].as_f64().unwrap());
    // With the cached assistant model, one streamed answer.
    if !s["assistant"].is_null() {
        assert!(
            !s["assistant"]["answer"].as_str().unwrap().is_empty(),
            "{s}"
        );
        assert!(s["assistant"]["ttft_ms"].as_f64().unwrap() > 0.0);
    }
}
