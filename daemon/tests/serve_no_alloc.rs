//! After warm-up the serving core allocates nothing on its hot path: a
//! burst of NV12 frames through two models (ingest, latest-wins slots, EDF
//! dispatch, preprocessing, engine, decode, JSON) while two questions are
//! being answered (batched decode steps, streamed replies, final replies)
//! — proven with a counting global allocator over every thread.
//!
//! Admitting a question (tokenizing, the sequence's state, its prefill)
//! allocates and happens before the counted window. This file holds a
//! single test so no other test allocates concurrently.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::*;
use osprey_daemon::config::Config;
use osprey_daemon::serve::{Core, Reply};

#[global_allocator]
static GLOBAL: osprey_engine::testing::Counting = osprey_engine::testing::Counting;

/// Keeps the replies in preallocated storage (no allocation per reply).
struct FixedReply {
    log: Arc<Mutex<(Vec<u8>, usize, bool)>>,
}

impl Reply for FixedReply {
    fn send(&mut self, payload: &[u8]) {
        let mut l = self.log.lock().unwrap();
        let room = l.0.capacity() - l.0.len();
        let n = payload.len().min(room);
        l.0.extend_from_slice(&payload[..n]);
        l.1 += 1;
        if payload.windows(11).any(|w| w == b"\"done\":true") {
            l.2 = true;
        }
    }
}

#[test]
fn frames_and_decode_steps_allocate_nothing_after_warm_up() {
    let dir = fixture("noalloc");
    let path = dir.join("ospreyd.toml");
    let text = config_text("").replace("max_answer_tokens = 24", "max_answer_tokens = 120");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    let sink = Arc::new(CountingSink::default());
    let (core, _) = Core::start(cfg, sink.clone()).unwrap();
    // No capture time (0): the frames are built before warm-up and used
    // seconds later; stamped with the build time they would be older than
    // their 2 s deadline on a slow machine and expire unprocessed, which is
    // not what this test is about.
    let frames: Vec<Vec<u8>> = (0..24).map(|s| nv12_packet(320, 240, s, 0)).collect();
    // Warm-up: a few frames through both models.
    for f in &frames[..4] {
        // The count before the frame goes in: read after, a fast enough
        // detection could already be in it and the wait would never end.
        let done = sink.count[0].load(Ordering::SeqCst);
        core.ingest("front", f);
        until(60, "warm-up frame", || {
            sink.count[0].load(Ordering::SeqCst) > done
        });
    }
    // Two questions, admitted and prefilled before the window.
    let logs: Vec<_> = (0..2)
        .map(|_| Arc::new(Mutex::new((Vec::with_capacity(1 << 16), 0usize, false))))
        .collect();
    for (i, l) in logs.iter().enumerate() {
        core.ask(
            if i == 0 {
                "Where is the charging dock?"
            } else {
                "Is the arm calibrated?"
            },
            Box::new(FixedReply { log: l.clone() }),
        );
    }
    until(30, "both answers streaming", || {
        logs.iter().all(|l| l.lock().unwrap().1 >= 2)
    });
    let m = core.metrics().clone();
    let before = (
        m.models[0].processed.load(Ordering::SeqCst),
        m.assistant.tokens.load(Ordering::SeqCst),
    );
    let steps_before = m.assistant.step.summary().count;
    let allocs = osprey_engine::testing::allocations_in(|| {
        for f in &frames[4..] {
            let done = sink.count[0].load(Ordering::SeqCst);
            core.ingest("front", f);
            let t = std::time::Instant::now();
            while sink.count[0].load(Ordering::SeqCst) == done
                && t.elapsed() < std::time::Duration::from_secs(20)
            {
                std::thread::yield_now();
            }
        }
        let t = std::time::Instant::now();
        while !logs.iter().all(|l| l.lock().unwrap().2)
            && t.elapsed() < std::time::Duration::from_secs(60)
        {
            std::thread::yield_now();
        }
    });
    let processed = m.models[0].processed.load(Ordering::SeqCst) - before.0;
    let steps = m.assistant.step.summary().count - steps_before;
    assert!(
        processed >= 15,
        "frames processed in the window: {processed}"
    );
    assert!(steps >= 10, "decode steps in the window: {steps}");
    assert!(
        logs.iter().all(|l| l.lock().unwrap().2),
        "both answers finished in the window"
    );
    assert!(m.assistant.tokens.load(Ordering::SeqCst) > before.1);
    core.shutdown();
    assert_eq!(
        allocs, 0,
        "allocations while serving {processed} frames and {steps} decode steps"
    );
}
