//! ospreyd end to end on loopback: started as systemd would (a unix
//! datagram socket stands in for NOTIFY_SOCKET), it reports READY=1 after
//! warm-up and pings the watchdog; `osprey camera` frames come back as
//! detections through `osprey watch`; `osprey ask` streams the same answer
//! the LLM runtime gives directly; `osprey status` shows the models;
//! SIGHUP reloads; SIGTERM drains and exits 0. A bad config exits 78
//! (EX_CONFIG) with one line.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osprey_models::vision::{draw, RgbImage};

const OSPREYD: &str = env!("CARGO_BIN_EXE_ospreyd");
const OSPREY: &str = env!("CARGO_BIN_EXE_osprey");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads notify messages until one starts with `prefix`.
fn expect(sock: &UnixDatagram, prefix: &str, seen: &mut Vec<String>) -> String {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(120) {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(m.clone());
            if m.starts_with(prefix) {
                return m;
            }
        }
    }
    panic!("no {prefix} from ospreyd; got {seen:?}");
}

fn client(args: &[&str], endpoint: &str) -> std::process::Output {
    Command::new(OSPREY)
        .args(args)
        .args(["--connect", endpoint, "--robot", "testbot"])
        .output()
        .unwrap()
}

#[test]
fn ospreyd_serves_frames_and_questions_over_zenoh() {
    let dir = fixture("e2e");
    let port = free_port();
    let endpoint = format!("tcp/127.0.0.1:{port}");
    let text = config_text("").replace(
        "robot = \"testbot\"",
        &format!("robot = \"testbot\"\n[zenoh]\nmode = \"peer\"\nlisten = [\"{endpoint}\"]\n"),
    );
    std::fs::write(dir.join("ospreyd.toml"), &text).unwrap();
    let img = RgbImage {
        width: 96,
        height: 64,
        data: (0..96 * 64 * 3).map(|i| (i % 253) as u8).collect(),
    };
    draw::save(&img, &dir.join("frame.png")).unwrap();

    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut daemon = Spawned(
        Command::new(OSPREYD)
            .args(["--config", dir.join("ospreyd.toml").to_str().unwrap()])
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = Pid::from_raw(daemon.0.id() as i32);
    let mut seen = Vec::new();
    let ready = expect(&sock, "READY=1", &mut seen);
    assert!(
        ready.contains("STATUS=serving 2 model(s) and the assistant for robot testbot"),
        "{ready}"
    );
    expect(&sock, "WATCHDOG=1", &mut seen);

    let watch = Command::new(OSPREY)
        .args([
            "watch",
            "perception/*/detections",
            "--count",
            "4",
            "--timeout",
            "60",
        ])
        .args(["--connect", &endpoint, "--robot", "testbot"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let cam = client(
        &[
            "camera",
            "--image",
            dir.join("frame.png").to_str().unwrap(),
            "--count",
            "6",
            "--fps",
            "5",
            "--encoding",
            "nv12",
        ],
        &endpoint,
    );
    assert!(
        cam.status.success(),
        "{}",
        String::from_utf8_lossy(&cam.stderr)
    );
    let out = watch.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let dets: Vec<serde_json::Value> = lines
        .lines()
        .filter(|l| l.contains("/perception/det/detections"))
        .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
        .collect();
    assert!(!dets.is_empty(), "watch printed: {lines}");
    for d in &dets {
        assert_eq!(d["camera"], "front");
        assert_eq!(d["encoding"], "nv12");
        assert_eq!(
            (d["width"].as_u64(), d["height"].as_u64()),
            (Some(96), Some(64))
        );
        assert!(!d["detections"].as_array().unwrap().is_empty());
        assert!(d["latency_ms"]["end_to_end"].as_f64().unwrap() > 0.0);
    }

    let q = "How do I reset the lidar?";
    let ask = client(&["ask", q], &endpoint);
    assert!(
        ask.status.success(),
        "{}",
        String::from_utf8_lossy(&ask.stderr)
    );
    let answer = String::from_utf8_lossy(&ask.stdout).into_owned();
    assert_eq!(
        answer.strip_suffix('\n').unwrap(),
        reference_answer(&dir, q)
    );

    let status = client(&["status"], &endpoint);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let table = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(table.contains("robot testbot  state ok"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("det ") && l.contains("serving")),
        "{table}"
    );
    assert!(table.contains("assistant  questions 1"), "{table}");

    kill(pid, Signal::SIGHUP).unwrap();
    expect(&sock, "RELOADING=1", &mut seen);
    expect(&sock, "READY=1", &mut seen);
    kill(pid, Signal::SIGTERM).unwrap();
    expect(&sock, "STOPPING=1", &mut seen);
    let t = Instant::now();
    let code = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "ospreyd did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    use std::io::Read as _;
    daemon
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert_eq!(code.code(), Some(0), "{log}");
    assert!(log.contains("reload: nothing changed"), "{log}");
    assert!(log.contains("drained; exiting"), "{log}");
}

#[test]
fn a_bad_config_exits_78_with_one_line() {
    let dir = fixture("badcfg");
    std::fs::write(
        dir.join("ospreyd.toml"),
        config_text("").replace("deadline_ms = 2000", "deadline_ms = 0"),
    )
    .unwrap();
    let out = Command::new(OSPREYD)
        .args(["--config", dir.join("ospreyd.toml").to_str().unwrap()])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("deadline_ms must be above 0"), "{err}");
    let out = Command::new(OSPREYD)
        .args(["--config", "/nonexistent/ospreyd.toml"])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    // --check validates and loads every model without serving.
    std::fs::write(dir.join("ospreyd.toml"), config_text("")).unwrap();
    let out = Command::new(OSPREYD)
        .args([
            "--check",
            "--config",
            dir.join("ospreyd.toml").to_str().unwrap(),
        ])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("OK (2 model(s), assistant; 0 admission warning(s))"));
}
