//! Fixtures for the daemon tests: a synthetic YOLO detector and classifier
//! (ONNX written to a temp dir), their descriptions, a tiny GGUF assistant,
//! frame packets, and sinks that record what the core publishes.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use osprey_daemon::serve::{Outputs, Reply};
use osprey_models::vision::packet::{self, Encoding, Header};
use osprey_models::vision::testing::{const_head_onnx, yolo_head};
use osprey_models::vision::PixelFormat;

/// Boxes in the synthetic YOLO head.
pub const BOXES: usize = 120;

/// A fresh temp dir with det.onnx/det.toml, cls.onnx/cls.toml,
/// labels.txt and tiny.gguf.
pub fn fixture(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ospreyd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_detector(&dir, 0);
    std::fs::write(
        dir.join("cls.onnx"),
        const_head_onnx(32, 32, &[("logits", vec![1, 3], vec![0.5, 2.0, -1.0])]),
    )
    .unwrap();
    std::fs::write(dir.join("labels.txt"), "person\nbicycle\ncar\n").unwrap();
    std::fs::write(
        dir.join("det.toml"),
        r#"
kind = "detector"
decoder = "yolov5"
labels = "labels.txt"
[input]
name = "images"
width = 64
height = 64
[preprocess]
filter = "bilinear"
resize = "letterbox"
[decode]
score_threshold = 0.05
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("cls.toml"),
        r#"
kind = "classifier"
decoder = "softmax"
labels = "labels.txt"
[input]
name = "images"
width = 32
height = 32
[preprocess]
filter = "pillow_bilinear"
[decode]
top = 2
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("tiny.gguf"),
        osprey_models::llm::testing::tiny_gguf(512),
    )
    .unwrap();
    dir
}

/// (Re)writes det.onnx; `variant` shifts the boxes so a swap is visible.
pub fn write_detector(dir: &Path, variant: usize) {
    let mut head = yolo_head(BOXES, 3, 64);
    for b in 0..BOXES {
        head[b * 8] = (head[b * 8] + variant as f32 * 3.0) % 64.0;
    }
    std::fs::write(
        dir.join("det.onnx"),
        const_head_onnx(64, 64, &[("output0", vec![1, BOXES, 8], head)]),
    )
    .unwrap();
}

/// Config text: the detector and classifier on camera "front" (lane
/// "perception"), the assistant on lane "assistant".
pub fn config_text(extra_assistant: &str) -> String {
    format!(
        r#"
robot = "testbot"
[[models]]
name = "det"
onnx = "det.onnx"
model_desc = "det.toml"
cameras = ["front"]
deadline_ms = 2000
lane = "perception"
fps = 5
[[models]]
name = "cls"
onnx = "cls.onnx"
model_desc = "cls.toml"
cameras = ["front", "rear"]
deadline_ms = 2000
lane = "perception"
fps = 5
[assistant]
model = "tiny.gguf"
kv_budget_bytes = 4194304
max_concurrent = 2
max_prompt_tokens = 384
max_answer_tokens = 24
lane = "assistant"
{extra_assistant}
[pools]
frame_bytes = 16777216
max_frame_bytes = 1048576
lock_memory = false
[[scheduler.lanes]]
name = "perception"
cpu_workers = 1
[[scheduler.lanes]]
name = "assistant"
cpu_workers = 1
"#
    )
}

#[allow(unused_imports)]
pub use osprey_models::vision::packet::now_ns;

/// An NV12 frame packet of `w`×`h` with a deterministic pattern.
pub fn nv12_packet(w: u32, h: u32, seq: u64, capture_ns: u64) -> Vec<u8> {
    let n = (w * h * 3 / 2) as usize;
    let pixels: Vec<u8> = (0..n)
        .map(|i| ((i * 7 + seq as usize) % 251) as u8)
        .collect();
    let mut out = Vec::new();
    packet::write(
        &Header {
            encoding: Encoding::Raw(PixelFormat::Nv12),
            width: w,
            height: h,
            stride: 0,
            capture_ns,
            seq,
        },
        &pixels,
        &mut out,
    );
    out
}

/// Records every publication (allocates: functional tests only).
#[derive(Default)]
pub struct RecordingSink {
    pub published: Mutex<Vec<(usize, Vec<u8>)>>,
}

impl Outputs for RecordingSink {
    fn publish(&self, model: usize, payload: &[u8]) {
        self.published
            .lock()
            .unwrap()
            .push((model, payload.to_vec()));
    }
}

impl RecordingSink {
    /// Publications of `model` parsed as JSON.
    pub fn of(&self, model: usize) -> Vec<serde_json::Value> {
        self.published
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| *m == model)
            .map(|(_, b)| serde_json::from_slice(b).expect("published JSON parses"))
            .collect()
    }
}

/// Counts publications into fixed storage (allocation-free).
pub struct CountingSink {
    pub count: [AtomicUsize; 4],
}

impl Default for CountingSink {
    fn default() -> Self {
        CountingSink {
            count: std::array::from_fn(|_| AtomicUsize::new(0)),
        }
    }
}

impl Outputs for CountingSink {
    fn publish(&self, model: usize, payload: &[u8]) {
        assert!(payload.first() == Some(&b'{'));
        if let Some(c) = self.count.get(model) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Collects an answer's replies (JSON values).
#[derive(Clone, Default)]
pub struct Answer {
    pub replies: Arc<Mutex<Vec<serde_json::Value>>>,
    pub closed: Arc<AtomicUsize>,
}

pub struct AnswerReply(pub Answer);

impl Reply for AnswerReply {
    fn send(&mut self, payload: &[u8]) {
        let v = serde_json::from_slice(payload).expect("reply JSON parses");
        self.0.replies.lock().unwrap().push(v);
    }
}

impl Drop for AnswerReply {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Answer {
    /// Waits until the stream was closed.
    pub fn wait(&self, secs: u64) -> Vec<serde_json::Value> {
        let t = Instant::now();
        while self.closed.load(Ordering::SeqCst) == 0 {
            assert!(t.elapsed() < Duration::from_secs(secs), "answer timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.replies.lock().unwrap().clone()
    }

    /// The streamed text.
    pub fn text(replies: &[serde_json::Value]) -> String {
        replies.iter().filter_map(|r| r["text"].as_str()).collect()
    }
}

/// Waits until `f` holds.
pub fn until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A spawned daemon that is killed if the test panics before it exits.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The answer the LLM runtime gives directly (greedy, 24 tokens) to `q`
/// with the system prompt and arithmetic of `dir`'s config: the reference
/// for streamed answers.
pub fn reference_answer(dir: &Path, q: &str) -> String {
    use osprey_models::llm::model::Model;
    use osprey_models::llm::runtime::{GenOptions, Runtime};
    use osprey_models::llm::tokenizer::Tokenizer;
    let a = osprey_daemon::config::Config::load(&dir.join("ospreyd.toml"))
        .unwrap()
        .assistant
        .unwrap();
    let mut model = Model::load(&dir.join("tiny.gguf")).unwrap();
    // The arithmetic the config asks for.
    model.set_int8_activations(a.int8_activations);
    if a.kv_f16 {
        model.kv_precision = osprey_models::llm::kv::KvPrecision::F16;
    }
    let model = Arc::new(model);
    let sys = a.system_prompt;
    let ids = model
        .tokenizer
        .encode(&Tokenizer::chat_prompt(Some(&sys), q), true)
        .unwrap();
    let mut rt = Runtime::new(model, 4 << 20, 1, 8).unwrap();
    let opts = GenOptions {
        max_tokens: 24,
        ..GenOptions::default()
    };
    let id = rt.add(&ids, opts).unwrap();
    rt.prefill(id).unwrap();
    while rt.done(id).is_none() {
        rt.step().unwrap();
    }
    rt.finish(id).unwrap().1
}
