//! The serving core without zenoh: frames to detections (checked against
//! the vision pipeline run directly), latest-wins slots under a burst,
//! deadlines, bad frames, streamed answers (checked against the LLM
//! runtime run directly), busy refusals, drain and reload.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use osprey_daemon::config::Config;
use osprey_daemon::serve::{Core, Reply};
use osprey_engine::onnx::import_file;
use osprey_engine::Engine;
use osprey_models::vision::desc::ModelDesc;
use osprey_models::vision::packet;
use osprey_models::vision::{Detector, FrameLimits};

fn start(tag: &str, extra: &str) -> (std::path::PathBuf, Arc<Core>, Arc<RecordingSink>) {
    let dir = fixture(tag);
    let path = dir.join("ospreyd.toml");
    let text = config_text(extra);
    std::fs::write(&path, &text).unwrap();
    let cfg = Config::load(&path).unwrap();
    let sink = Arc::new(RecordingSink::default());
    let (core, report) = Core::start(cfg, sink.clone()).unwrap();
    assert_eq!(report.latency_ms.len(), 2);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    (dir, core, sink)
}

fn direct_detections(dir: &std::path::Path, pkt: &[u8]) -> Vec<[f32; 4]> {
    let desc = ModelDesc::load(&dir.join("det.toml")).unwrap();
    let mut shapes = HashMap::new();
    shapes.insert("images".to_string(), desc.input_shape());
    let mut g = import_file(&dir.join("det.onnx"), &shapes).unwrap();
    osprey_engine::passes::optimize(&mut g);
    let mut det = Detector::new(Arc::new(Engine::new(g).unwrap()), desc, 1).unwrap();
    let (h, p) = packet::parse(pkt).unwrap();
    let frame = h.frame(p, &FrameLimits::default()).unwrap();
    det.detect(&frame)
        .unwrap()
        .0
        .iter()
        .map(|d| d.bbox())
        .collect()
}

#[test]
fn frames_become_detections_equal_to_the_pipeline_run_directly() {
    let (dir, core, sink) = start("flow", "");
    let capture = now_ns();
    let pkt = nv12_packet(160, 120, 7, capture);
    core.ingest("front", &pkt);
    until(20, "detector and classifier results", || {
        !sink.of(0).is_empty() && !sink.of(1).is_empty()
    });
    let d = &sink.of(0)[0];
    assert_eq!(d["model"], "det");
    assert_eq!(d["camera"], "front");
    assert_eq!(d["seq"], 7);
    assert_eq!(d["capture_ns"], capture);
    assert_eq!(
        (d["width"].as_u64(), d["height"].as_u64()),
        (Some(160), Some(120))
    );
    let got: Vec<[f32; 4]> = d["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let b: Vec<f32> = x["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            [b[0], b[1], b[2], b[3]]
        })
        .collect();
    let want = direct_detections(&dir, &pkt);
    assert!(!want.is_empty());
    assert_eq!(got, want);
    for x in d["detections"].as_array().unwrap() {
        let id = x["class_id"].as_u64().unwrap() as usize;
        assert_eq!(x["label"], ["person", "bicycle", "car"][id]);
    }
    let lat = &d["latency_ms"];
    assert!(lat["end_to_end"].as_f64().unwrap() >= lat["total"].as_f64().unwrap());
    let c = &sink.of(1)[0];
    assert_eq!(c["classes"][0]["label"], "bicycle");
    assert_eq!(c["classes"].as_array().unwrap().len(), 2);
    // "rear" reaches only the classifier; unknown cameras are counted.
    core.ingest("rear", &nv12_packet(64, 48, 8, now_ns()));
    core.ingest("left", &nv12_packet(64, 48, 9, now_ns()));
    until(20, "rear frame", || sink.of(1).len() == 2);
    assert_eq!(sink.of(1)[1]["camera"], "rear");
    let m = core.metrics();
    assert_eq!(m.unrouted_frames.load(Ordering::SeqCst), 1);
    assert_eq!(m.models[0].processed.load(Ordering::SeqCst), 1);
    let health = core.health();
    assert_eq!(health["models"]["det"]["state"], "serving");
    let metrics = core.metrics_json();
    assert_eq!(metrics["models"]["cls"]["processed"], 2);
    core.shutdown();
}

#[test]
fn a_burst_drops_the_oldest_frames_and_never_queues() {
    let (_dir, core, sink) = start("burst", "");
    let n = 60u64;
    for seq in 0..n {
        core.ingest("front", &nv12_packet(640, 480, seq, now_ns()));
    }
    let m = core.metrics();
    let settled = |i: usize| {
        let mm = &m.models[i];
        mm.processed.load(Ordering::SeqCst)
            + mm.dropped.load(Ordering::SeqCst)
            + mm.deadline_misses.load(Ordering::SeqCst)
            + mm.errors.load(Ordering::SeqCst)
    };
    until(60, "every frame accounted for", || {
        settled(0) >= n && settled(1) >= n
    });
    for i in 0..2 {
        let mm = &m.models[i];
        assert_eq!(mm.received.load(Ordering::SeqCst), n);
        assert!(
            mm.dropped.load(Ordering::SeqCst) > 0,
            "a burst of {n} VGA frames should overrun one worker"
        );
        assert_eq!(mm.queue_depth.load(Ordering::SeqCst), 0);
    }
    // Latest wins: the last frame is always processed.
    let seqs: Vec<u64> = sink
        .of(0)
        .iter()
        .map(|d| d["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.last(), Some(&(n - 1)), "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    core.shutdown();
}

#[test]
fn stale_and_bad_frames_are_counted_and_serving_goes_on() {
    let (_dir, core, sink) = start("stale", "");
    // Captured 10 s ago with a 2 s deadline: dropped at dispatch.
    core.ingest("front", &nv12_packet(64, 48, 1, now_ns() - 10_000_000_000));
    let m = core.metrics();
    until(20, "deadline misses", || {
        m.models[0].deadline_misses.load(Ordering::SeqCst) == 1
    });
    let mut bad = nv12_packet(64, 48, 2, now_ns());
    bad[4] = 9; // version 9
    core.ingest("front", &bad);
    core.ingest("front", b"garbage");
    let mut short = nv12_packet(64, 48, 3, now_ns());
    short.truncate(100);
    core.ingest("front", &short);
    // Too large for pools.max_frame_bytes.
    core.ingest("front", &nv12_packet(1024, 1024, 4, now_ns()));
    until(20, "errors", || {
        m.models[0].errors.load(Ordering::SeqCst) == 4
    });
    // A header that parses but whose pixels do not fit the size fails in
    // the job, also counted.
    let mut lying = nv12_packet(64, 48, 5, now_ns());
    lying[8..12].copy_from_slice(&4000u32.to_le_bytes());
    core.ingest("front", &lying);
    until(20, "job error", || {
        m.models[0].errors.load(Ordering::SeqCst) == 5
    });
    core.ingest("front", &nv12_packet(64, 48, 6, now_ns()));
    until(20, "a good frame after the bad ones", || {
        !sink.of(0).is_empty()
    });
    assert_eq!(sink.of(0)[0]["seq"], 6);
    core.shutdown();
}

#[test]
fn answers_stream_and_equal_the_runtime_run_directly() {
    answers_stream("ask", "");
}

#[test]
fn answers_with_llama_cpp_arithmetic_and_an_f16_cache() {
    answers_stream("ask-f16", "kv_f16 = true\nint8_activations = true");
}

/// A reply that holds every send until `open` is set: its question stays
/// in flight (a question leaves the count after its last send), however
/// fast the machine answers.
struct Gated(AnswerReply, Arc<AtomicBool>);

impl Reply for Gated {
    fn send(&mut self, payload: &[u8]) {
        while !self.1.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.0.send(payload);
    }
}

fn answers_stream(tag: &str, extra: &str) {
    let (dir, core, _sink) = start(tag, extra);
    let a = Answer::default();
    let b = Answer::default();
    let c = Answer::default();
    // Both answers are held until the third question was refused: without
    // the gate a fast (or briefly descheduled) test thread could see the
    // first answer end before it asks the third.
    let gate = Arc::new(AtomicBool::new(false));
    core.ask(
        "How do I reset the lidar?",
        Box::new(Gated(AnswerReply(a.clone()), gate.clone())),
    );
    core.ask(
        "Battery status?",
        Box::new(Gated(AnswerReply(b.clone()), gate.clone())),
    );
    // max_concurrent = 2: the third is refused at once.
    core.ask("And the wheels?", Box::new(AnswerReply(c.clone())));
    let rc = c.wait(10);
    gate.store(true, Ordering::SeqCst);
    assert_eq!(rc.len(), 1);
    assert!(
        rc[0]["error"].as_str().unwrap().starts_with("busy"),
        "{rc:?}"
    );
    for (ans, q) in [(&a, "How do I reset the lidar?"), (&b, "Battery status?")] {
        let r = ans.wait(60);
        assert!(r.len() >= 3, "streamed in pieces: {r:?}");
        let last = r.last().unwrap();
        assert_eq!(last["done"], true);
        assert!(["eos", "max_tokens"].contains(&last["stop"].as_str().unwrap()));
        assert!(r[..r.len() - 1].iter().all(|x| x["done"] == false));
        let idx: Vec<u64> = r.iter().map(|x| x["index"].as_u64().unwrap()).collect();
        assert!(idx.windows(2).all(|w| w[1] == w[0] + 1), "{idx:?}");
        assert_eq!(Answer::text(&r), reference_answer(&dir, q));
    }
    let e = Answer::default();
    core.ask("   ", Box::new(AnswerReply(e.clone())));
    assert!(e.wait(5)[0]["error"].as_str().unwrap().contains("empty"));
    let long = "why ".repeat(200);
    let f = Answer::default();
    core.ask(&long, Box::new(AnswerReply(f.clone())));
    assert!(f.wait(5)[0]["error"]
        .as_str()
        .unwrap()
        .contains("max_prompt_tokens"));
    let m = core.metrics_json();
    assert_eq!(m["assistant"]["questions"], 2);
    assert_eq!(m["assistant"]["rejected"], 3);
    core.shutdown();
}

#[test]
fn drain_finishes_or_cancels_accepted_work() {
    let (_dir, core, sink) = start("drain", "");
    let a = Answer::default();
    core.ask("Tell me everything.", Box::new(AnswerReply(a.clone())));
    core.ingest("front", &nv12_packet(160, 120, 1, now_ns()));
    // Enough time for everything accepted: all of it finishes.
    assert!(core.drain(Duration::from_secs(60)));
    let r = a.wait(1);
    assert_eq!(r.last().unwrap()["done"], true);
    assert_ne!(r.last().unwrap()["stop"], "cancelled");
    assert_eq!(sink.of(0).len(), 1);

    let (dir, core, _sink) = start("drain2", "");
    // A long answer (as long as the tiny model's context allows), so it is
    // still running when the drain starts even when the test threads are
    // descheduled between the question and the drain (100 tokens once
    // finished first on a loaded 2-core machine).
    let text = config_text("")
        .replace("max_prompt_tokens = 384", "max_prompt_tokens = 160")
        .replace("max_answer_tokens = 24", "max_answer_tokens = 340");
    std::fs::write(dir.join("ospreyd.toml"), text).unwrap();
    core.shutdown();
    let cfg = Config::load(&dir.join("ospreyd.toml")).unwrap();
    let (core, _) = Core::start(cfg, Arc::new(RecordingSink::default())).unwrap();
    let b = Answer::default();
    core.ask("Tell me everything.", Box::new(AnswerReply(b.clone())));
    // No time at all: the question is cancelled with a final reply.
    core.drain(Duration::ZERO);
    let r = b.wait(5);
    assert_eq!(r.last().unwrap()["stop"], "cancelled", "{r:?}");
}

#[test]
fn reload_swaps_changed_engines_and_deadlines() {
    let (dir, core, sink) = start("reload", "");
    let pkt = nv12_packet(160, 120, 1, now_ns());
    core.ingest("front", &pkt);
    until(20, "first result", || sink.of(0).len() == 1);
    let before = sink.of(0)[0]["detections"].clone();
    // Unchanged config: nothing to do.
    let cfg = Config::load(&dir.join("ospreyd.toml")).unwrap();
    assert!(core.reload(cfg).unwrap().is_empty());
    std::thread::sleep(Duration::from_millis(20));
    write_detector(&dir, 1);
    let text = config_text("").replacen("deadline_ms = 2000", "deadline_ms = 1500", 1);
    let text = text.replace("max_concurrent = 2", "max_concurrent = 3");
    std::fs::write(dir.join("ospreyd.toml"), text).unwrap();
    let cfg = Config::load(&dir.join("ospreyd.toml")).unwrap();
    let notes = core.reload(cfg).unwrap();
    let joined = notes.join("\n");
    assert!(
        joined.contains("model \"det\": engine reloaded"),
        "{joined}"
    );
    assert!(joined.contains("deadline 1500 ms"), "{joined}");
    assert!(joined.contains("[assistant] changed: restart"), "{joined}");
    core.ingest("front", &nv12_packet(160, 120, 2, now_ns()));
    until(20, "result after the swap", || sink.of(0).len() == 2);
    let after = &sink.of(0)[1];
    assert_eq!(after["seq"], 2);
    assert_ne!(
        after["detections"], before,
        "the swapped engine gives other boxes"
    );
    let want = direct_detections(&dir, &nv12_packet(160, 120, 2, 0));
    assert_eq!(after["detections"].as_array().unwrap().len(), want.len());
    core.shutdown();
}

#[test]
fn budgets_that_cannot_hold_the_pools_fail_naming_the_pool() {
    let dir = fixture("budget");
    let path = dir.join("ospreyd.toml");
    let err = |text: String| {
        std::fs::write(&path, text).unwrap();
        let cfg = Config::load(&path).unwrap();
        match Core::start(cfg, Arc::new(RecordingSink::default())) {
            Ok(_) => panic!("should fail"),
            Err(e) => format!("{e:#}"),
        }
    };
    let e = err(config_text("").replace("frame_bytes = 16777216", "frame_bytes = 1000000"));
    assert!(e.contains("pools.frame_bytes"), "{e}");
    let e = err(config_text("").replace("kv_budget_bytes = 4194304", "kv_budget_bytes = 100000"));
    assert!(e.contains("kv_budget_bytes"), "{e}");
    let e = err(config_text("")
        .replace("arena_bytes", "x")
        .replace("[pools]", "[pools]\narena_bytes = 1000"));
    assert!(e.contains("pools.arena_bytes"), "{e}");
    let e = err(config_text("").replace("det.onnx", "missing.onnx"));
    assert!(
        e.contains("missing.onnx") && e.contains("model \"det\""),
        "{e}"
    );
}

#[test]
fn admission_names_the_overloaded_lane_and_impossible_deadlines() {
    let dir = fixture("admission");
    let path = dir.join("ospreyd.toml");
    let text = config_text("")
        .replacen("fps = 5", "fps = 100000", 1)
        .replacen("deadline_ms = 2000", "deadline_ms = 1", 1)
        .replace("[assistant]", "[assistant]\nthreads = 1");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    let (core, report) = Core::start(cfg, Arc::new(RecordingSink::default())).unwrap();
    let w = report.warnings.join("\n");
    assert!(w.contains("lane \"perception\" is overloaded"), "{w}");
    assert!(w.contains("det: 1 camera(s) x 100000 fps"), "{w}");
    let perception = report
        .lanes
        .iter()
        .find(|(n, _)| n == "perception")
        .unwrap();
    assert!(perception.1 > 1.0, "{:?}", report.lanes);
    // 1 ms is below one frame's latency only if the detector takes longer;
    // the warning, when present, names the model and its deadline.
    if report.latency_ms[0] > 1.0 {
        assert!(w.contains("model \"det\": one frame takes"), "{w}");
    }
    core.shutdown();
}
