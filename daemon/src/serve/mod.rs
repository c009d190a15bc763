//! The serving core of `ospreyd`, independent of zenoh: frames in,
//! detections out; questions in, streamed answers out.
//!
//! * Every (model, camera) pair has a **latest-wins slot**: a few packet
//!   buffers reserved at start-up; a new frame replaces a pending one (the
//!   old one is dropped and counted), so an overloaded daemon never queues
//!   without bound.
//! * A pending frame is a **job** released on arrival with deadline
//!   `capture time + deadline_ms`. Each **lane** has CPU workers that always
//!   run the ready job with the earliest deadline (priority breaks ties); a
//!   job whose deadline has passed at dispatch is dropped and counted.
//! * The **assistant** is one more job on its lane: one prefill or one
//!   batched decode step per dispatch, with deadline `ready + step_deadline_ms`,
//!   so it yields to perception between tokens.
//!
//! After warm-up, frame jobs (raw encodings) and decode steps allocate
//! nothing: buffers, engine contexts, output JSON and the KV cache are
//! reserved at start-up (`tests/serve_no_alloc.rs` proves it).

mod assistant;
mod json;
mod lane;
mod perceiver;
mod reload;

use assistant::*;
use json::*;
use lane::*;
use perceiver::*;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use osprey_models::llm::model::Model;
use osprey_models::llm::runtime::{GenOptions, Runtime, SeqId, StopReason};
use osprey_models::llm::tokenizer::Tokenizer;
use osprey_models::vision::desc::{ModelDesc, ModelKind};
use osprey_models::vision::packet::{self, Encoding};
use osprey_models::vision::{
    decode_image, Classifier, Detector, FrameLimits, RgbImage, StageTimes,
};

use crate::cli::{load_engine, ModelArgs};
use crate::config::{AssistantConfig, Config, ModelConfig};
use crate::metrics::Metrics;

/// Where perception results go (zenoh publishers, or a test sink).
pub trait Outputs: Send + Sync + 'static {
    /// Publishes one result (JSON) of model `model` (config order).
    fn publish(&self, model: usize, payload: &[u8]);
}

/// One streamed answer: each call sends one reply; dropping it ends the
/// stream.
pub trait Reply: Send + 'static {
    /// Sends one reply (JSON).
    fn send(&mut self, payload: &[u8]);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The daemon's serving core.
pub struct Core {
    cfg: RwLock<Config>,
    stamps: Mutex<Vec<Stamp>>,
    names: Vec<String>,
    metrics: Arc<Metrics>,
    outputs: Arc<dyn Outputs>,
    routes: HashMap<String, Vec<(usize, usize)>>,
    lanes: Vec<Lane>,
    assistant: Option<Assistant>,
    limits: FrameLimits,
    max_frame: usize,
    started: Instant,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Start-up figures: what was reserved and how loaded each lane is.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// Median warm-up latency per model, ms (config order).
    pub latency_ms: Vec<f64>,
    /// Per lane: name and utilisation (busy workers at the configured
    /// rates; above 1.0 the lane cannot keep up).
    pub lanes: Vec<(String, f64)>,
    /// Admission warnings (overloaded lanes, deadlines below latency).
    pub warnings: Vec<String>,
    /// Bytes reserved for frame slots, engine contexts and the KV cache.
    pub reserved: [usize; 3],
}

impl Core {
    /// Loads every model and the assistant, reserves every pool, warms
    /// up, measures latencies and starts the lane workers.
    pub fn start(cfg: Config, outputs: Arc<dyn Outputs>) -> Result<(Arc<Core>, StartReport)> {
        let names: Vec<String> = cfg.models.iter().map(|m| m.name.clone()).collect();
        let metrics = Arc::new(Metrics::new(cfg.models.len()));
        let mut lanes = Vec::new();
        let mut routes: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        let mut frame_bytes = 0usize;
        let mut arena_bytes = 0usize;
        let max_frame = cfg.pools.max_frame_bytes;
        for (li, lc) in cfg.scheduler.lanes.iter().enumerate() {
            if lc.cuda_streams > 0 {
                tracing::warn!(
                    "lane {:?}: cuda_streams = {} ignored: this build runs perception on CPU workers",
                    lc.name,
                    lc.cuda_streams
                );
            }
            let n_workers = lc.cpu_workers.max(1);
            let models: Vec<usize> = (0..cfg.models.len())
                .filter(|&i| cfg.models[i].lane == lc.name)
                .collect();
            let mut per_worker: Vec<Vec<Perceiver>> = (0..n_workers).map(|_| Vec::new()).collect();
            for &mi in &models {
                let ps = load_perceivers(&cfg.models[mi], n_workers)?;
                for (w, p) in ps.into_iter().enumerate() {
                    arena_bytes += p.allocated_bytes();
                    per_worker[w].push(p);
                }
            }
            let mut slots = Vec::new();
            let mut bufs = Vec::new();
            for (local, &mi) in models.iter().enumerate() {
                let m = &cfg.models[mi];
                for cam in &m.cameras {
                    // One pending, one being written, one per busy worker.
                    let n_bufs = n_workers + 2;
                    frame_bytes += n_bufs * max_frame;
                    if frame_bytes > cfg.pools.frame_bytes {
                        bail!(
                            "pools.frame_bytes: {} bytes cannot hold the frame slots ({} bytes needed so far: {} buffers of pools.max_frame_bytes = {max_frame} per model and camera); raise it or lower max_frame_bytes",
                            cfg.pools.frame_bytes,
                            frame_bytes,
                            n_bufs
                        );
                    }
                    routes
                        .entry(cam.clone())
                        .or_default()
                        .push((li, slots.len()));
                    bufs.push(
                        (0..n_bufs)
                            .map(|_| {
                                // Touch the pages so they are resident (and
                                // locked under mlockall) before serving.
                                let mut v = vec![0u8; max_frame];
                                v.clear();
                                Mutex::new(v)
                            })
                            .collect(),
                    );
                    slots.push(Slot {
                        model: mi,
                        local,
                        camera: cam.clone(),
                        deadline: Duration::from_millis(m.deadline_ms),
                        priority: m.priority,
                        free: (0..n_bufs).collect(),
                        pending: None,
                    });
                }
            }
            lanes.push(Lane {
                name: lc.name.clone(),
                models,
                bufs,
                state: Mutex::new(LaneState {
                    slots,
                    assistant: None,
                    running: 0,
                    stop: Stop::Run,
                }),
                cv: Condvar::new(),
                workers: per_worker.into_iter().map(Mutex::new).collect(),
                heartbeats: (0..n_workers).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        if arena_bytes > cfg.pools.arena_bytes {
            bail!(
                "pools.arena_bytes: the engine contexts need {arena_bytes} bytes, the budget is {}; raise it or use fewer workers",
                cfg.pools.arena_bytes
            );
        }
        let assistant = match &cfg.assistant {
            None => None,
            Some(a) => Some(Assistant::load(a, &cfg, &mut lanes)?),
        };
        metrics
            .frame_pool_bytes
            .store(frame_bytes, Ordering::Relaxed);
        metrics
            .arena_pool_bytes
            .store(arena_bytes, Ordering::Relaxed);
        let kv_bytes = assistant
            .as_ref()
            .map_or(0, |a| lock(&a.core).rt.kv().bytes());
        metrics.kv_pool_bytes.store(kv_bytes, Ordering::Relaxed);
        let limits = FrameLimits {
            max_width: cfg.pools.max_frame_side,
            max_height: cfg.pools.max_frame_side,
        };
        let stamps = cfg.models.iter().map(Stamp::of).collect();
        let core = Arc::new(Core {
            cfg: RwLock::new(cfg),
            stamps: Mutex::new(stamps),
            names,
            metrics,
            outputs,
            routes,
            lanes,
            assistant,
            limits,
            max_frame,
            started: Instant::now(),
            threads: Mutex::new(Vec::new()),
        });
        let report = core.warm_up(frame_bytes, arena_bytes, kv_bytes)?;
        let mut threads = lock(&core.threads);
        for li in 0..core.lanes.len() {
            for w in 0..core.lanes[li].workers.len() {
                let c = core.clone();
                let name = format!("osprey-{}-{w}", core.lanes[li].name);
                threads.push(
                    std::thread::Builder::new()
                        .name(name)
                        .spawn(move || c.worker(li, w))
                        .context("starting a lane worker")?,
                );
            }
        }
        drop(threads);
        Ok((core, report))
    }

    /// Runs every perceiver a few times on a grey frame of its input size
    /// (first-use allocations, caches) and the assistant once; measures
    /// latencies for the admission check.
    fn warm_up(&self, frame: usize, arena: usize, kv: usize) -> Result<StartReport> {
        let cfg = self.cfg();
        let mut latency = vec![0.0f64; cfg.models.len()];
        for lane in &self.lanes {
            for (w, wk) in lane.workers.iter().enumerate() {
                let mut ps = lock(wk);
                for (local, p) in ps.iter_mut().enumerate() {
                    let mi = lane.models[local];
                    let desc_in = match p {
                        Perceiver::Det(d) => d.desc().input.clone(),
                        Perceiver::Cls(c, _) => c.desc().input.clone(),
                    };
                    let img = RgbImage {
                        width: desc_in.width,
                        height: desc_in.height,
                        data: vec![128; desc_in.width * desc_in.height * 3],
                    };
                    let mut times = Vec::new();
                    for _ in 0..if w == 0 { 5 } else { 2 } {
                        let t = match p {
                            Perceiver::Det(d) => d.detect(&img.frame())?.1,
                            Perceiver::Cls(c, k) => c.classify(&img.frame(), *k)?.1,
                        };
                        times.push(t.total_ms());
                    }
                    if w == 0 {
                        times.sort_by(f64::total_cmp);
                        latency[mi] = times[times.len() / 2];
                    }
                }
            }
        }
        if let Some(a) = &self.assistant {
            a.warm_up()?;
        }
        let mut lanes = Vec::new();
        let mut warnings = Vec::new();
        for lane in &self.lanes {
            let workers = lane.workers.len() as f64;
            let mut parts = Vec::new();
            let mut busy = 0.0;
            for &mi in &lane.models {
                let m = &cfg.models[mi];
                let u = m.fps * m.cameras.len() as f64 * latency[mi] / 1e3;
                busy += u;
                parts.push(format!(
                    "{}: {} camera(s) x {} fps x {:.1} ms",
                    m.name,
                    m.cameras.len(),
                    m.fps,
                    latency[mi]
                ));
                if latency[mi] > m.deadline_ms as f64 {
                    warnings.push(format!(
                        "model {:?}: one frame takes {:.1} ms, above its deadline_ms = {}: every frame will miss",
                        m.name, latency[mi], m.deadline_ms
                    ));
                }
            }
            let util = busy / workers;
            if util > 1.0 {
                warnings.push(format!(
                    "lane {:?} is overloaded: {:.2} of {} worker(s) busy at the configured rates ({}); frames will be dropped",
                    lane.name,
                    busy,
                    lane.workers.len(),
                    parts.join(", ")
                ));
            }
            lanes.push((lane.name.clone(), util));
        }
        Ok(StartReport {
            latency_ms: latency,
            lanes,
            warnings,
            reserved: [frame, arena, kv],
        })
    }

    fn cfg(&self) -> std::sync::RwLockReadGuard<'_, Config> {
        self.cfg
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The robot name.
    pub fn robot(&self) -> String {
        self.cfg().robot.clone()
    }

    /// Model names, config order.
    pub fn model_names(&self) -> &[String] {
        &self.names
    }

    /// Output topic names (`{model}` part), config order.
    pub fn output_names(&self) -> Vec<String> {
        self.cfg()
            .models
            .iter()
            .map(|m| m.output_name().to_string())
            .collect()
    }

    /// Whether an assistant is configured.
    pub fn has_assistant(&self) -> bool {
        self.assistant.is_some()
    }

    /// The shared metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A frame packet arrived on camera `camera`. Never blocks on
    /// inference; copies the packet into each listening model's slot.
    pub fn ingest(&self, camera: &str, bytes: &[u8]) {
        let Some(routes) = self.routes.get(camera) else {
            self.metrics.unrouted_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let received = Instant::now();
        let header = match packet::parse(bytes) {
            Ok((h, _)) if bytes.len() <= self.max_frame => Ok(h),
            Ok(_) => Err(()),
            Err(_) => Err(()),
        };
        let Ok(header) = header else {
            for &(li, si) in routes {
                let mi = lock(&self.lanes[li].state).slots[si].model;
                self.metrics.models[mi]
                    .errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(
                camera,
                bytes = bytes.len(),
                "malformed or oversized frame dropped"
            );
            return;
        };
        let age = Duration::from_nanos(
            packet::now_ns()
                .checked_sub(header.capture_ns)
                .filter(|_| header.capture_ns > 0)
                .unwrap_or(0),
        );
        for &(li, si) in routes {
            let lane = &self.lanes[li];
            let (buf, mi, deadline) = {
                let mut st = lock(&lane.state);
                let slot = &mut st.slots[si];
                let mi = slot.model;
                self.metrics.models[mi]
                    .received
                    .fetch_add(1, Ordering::Relaxed);
                let Some(buf) = slot.free.pop() else {
                    self.metrics.models[mi]
                        .dropped
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                (buf, mi, slot.deadline.saturating_sub(age))
            };
            {
                let mut b = lock(&lane.bufs[si][buf]);
                b.clear();
                b.extend_from_slice(bytes);
            }
            let mut st = lock(&lane.state);
            let slot = &mut st.slots[si];
            let new = Pending {
                buf,
                deadline: received + deadline,
                capture_ns: header.capture_ns,
                received,
            };
            let m = &self.metrics.models[mi];
            match slot.pending.replace(new) {
                Some(old) => {
                    slot.free.push(old.buf);
                    m.dropped.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    m.queue_depth.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(st);
            lane.cv.notify_one();
        }
    }

    /// A question for the assistant. Answers stream through `reply`; a
    /// refusal (busy, too long, no assistant) is one error reply.
    pub fn ask(&self, text: &str, mut reply: Box<dyn Reply>) {
        let Some(a) = &self.assistant else {
            reply.send(br#"{"error":"this robot runs no assistant","done":true}"#);
            return;
        };
        match a.admit(text) {
            Ok(tokens) => {
                lock(&a.inbox).push(Question {
                    tokens,
                    reply,
                    received: Instant::now(),
                });
                self.metrics
                    .assistant
                    .questions
                    .fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .assistant
                    .waiting
                    .fetch_add(1, Ordering::Relaxed);
                self.assistant_ready(a);
            }
            Err(e) => {
                self.metrics
                    .assistant
                    .rejected
                    .fetch_add(1, Ordering::Relaxed);
                let msg = serde_json::json!({ "error": e.to_string(), "done": true });
                reply.send(msg.to_string().as_bytes());
            }
        }
    }

    fn assistant_ready(&self, a: &Assistant) {
        let lane = &self.lanes[a.lane];
        let mut st = lock(&lane.state);
        if let Some(j) = &mut st.assistant {
            if !j.ready {
                j.ready = true;
                j.deadline = Instant::now() + Duration::from_millis(a.cfg.step_deadline_ms);
            }
        }
        drop(st);
        lane.cv.notify_one();
    }

    fn worker(&self, li: usize, w: usize) {
        let lane = &self.lanes[li];
        let mut out = Vec::with_capacity(64 << 10);
        let mut decoded = RgbImage {
            width: 0,
            height: 0,
            data: Vec::new(),
        };
        loop {
            let job = {
                let mut st = lock(&lane.state);
                loop {
                    lane.heartbeats[w].store(self.clock_ms(), Ordering::Relaxed);
                    if st.stop == Stop::Now {
                        return;
                    }
                    self.expire(&mut st, Instant::now());
                    if let Some(job) = pick(&mut st) {
                        if matches!(job, Job::Assistant)
                            && st
                                .assistant
                                .as_ref()
                                .is_some_and(|j| j.deadline < Instant::now())
                        {
                            self.metrics
                                .assistant
                                .step_deadline_misses
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        st.running += 1;
                        break job;
                    }
                    if st.stop == Stop::Drain {
                        return;
                    }
                    st = lane
                        .cv
                        .wait_timeout(st, Duration::from_millis(100))
                        .map_or_else(|e| e.into_inner().0, |r| r.0);
                }
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &job {
                // A frame job leaves no work behind (`more` is the
                // assistant's).
                Job::Frame { slot, p } => self
                    .run_frame(li, w, *slot, *p, &mut out, &mut decoded)
                    .map(|()| false),
                Job::Assistant => self
                    .assistant
                    .as_ref()
                    .map_or(Ok(false), |a| a.run_job(&self.metrics)),
            }));
            let mut st = lock(&lane.state);
            st.running -= 1;
            match job {
                Job::Frame { slot, p } => {
                    st.slots[slot].free.push(p.buf);
                    let mi = st.slots[slot].model;
                    if !matches!(result, Ok(Ok(_))) {
                        self.metrics.models[mi]
                            .errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    match &result {
                        Ok(Err(e)) => tracing::warn!(
                            model = self.names[mi],
                            camera = st.slots[slot].camera,
                            "frame failed: {e:#}"
                        ),
                        Err(_) => tracing::error!(model = self.names[mi], "frame job panicked"),
                        Ok(Ok(_)) => {}
                    }
                }
                Job::Assistant => {
                    let more = match &result {
                        Ok(Ok(more)) => *more,
                        Ok(Err(e)) => {
                            tracing::error!("assistant step failed: {e:#}");
                            true
                        }
                        Err(_) => {
                            tracing::error!("assistant step panicked");
                            true
                        }
                    };
                    if let Some(j) = &mut st.assistant {
                        j.running = false;
                        if more {
                            j.ready = true;
                            j.deadline = Instant::now()
                                + Duration::from_millis(
                                    self.assistant
                                        .as_ref()
                                        .map_or(0, |a| a.cfg.step_deadline_ms),
                                );
                        }
                    }
                }
            }
            drop(st);
            lane.cv.notify_all();
        }
    }

    /// Drops pending frames whose deadline has passed (counted as misses).
    fn expire(&self, st: &mut LaneState, now: Instant) {
        for slot in &mut st.slots {
            if let Some(p) = slot.pending {
                if p.deadline <= now {
                    slot.pending = None;
                    slot.free.push(p.buf);
                    let m = &self.metrics.models[slot.model];
                    m.deadline_misses.fetch_add(1, Ordering::Relaxed);
                    m.expired.fetch_add(1, Ordering::Relaxed);
                    m.queue_depth.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn run_frame(
        &self,
        li: usize,
        w: usize,
        si: usize,
        p: Pending,
        out: &mut Vec<u8>,
        decoded: &mut RgbImage,
    ) -> Result<()> {
        let lane = &self.lanes[li];
        let (mi, local) = {
            let st = lock(&lane.state);
            (st.slots[si].model, st.slots[si].local)
        };
        let m = &self.metrics.models[mi];
        let queue_ms = p.received.elapsed().as_secs_f64() * 1e3;
        m.queue_depth.fetch_sub(1, Ordering::Relaxed);
        let buf = lock(&lane.bufs[si][p.buf]);
        let (header, payload) = packet::parse(&buf)?;
        let frame = match header.encoding {
            Encoding::Raw(_) => header.frame(payload, &self.limits)?,
            Encoding::Jpeg | Encoding::Png => {
                *decoded = decode_image(payload, &self.limits)?;
                decoded.frame()
            }
        };
        let mut ps = lock(&lane.workers[w]);
        let perceiver = ps
            .get_mut(local)
            .ok_or_else(|| anyhow!("worker {w} has no model {local}"))?;
        {
            // Camera names are fixed at start-up; copying one out of the
            // lock would allocate, so the head is written under it.
            let st = lock(&lane.state);
            out.clear();
            write_head(out, &self.names[mi], &st.slots[si].camera, &header)?;
        }
        let times = match perceiver {
            Perceiver::Det(d) => {
                let t = d.detect(&frame)?.1;
                write_detections(out, d.detections(), d.labels())?;
                t
            }
            Perceiver::Cls(c, k) => {
                let t = c.classify(&frame, *k)?.1;
                write_classes(out, c.classes(), c.labels())?;
                t
            }
        };
        drop(ps);
        drop(buf);
        let e2e_ms = if p.capture_ns > 0 {
            packet::now_ns().saturating_sub(p.capture_ns) as f64 / 1e6
        } else {
            p.received.elapsed().as_secs_f64() * 1e3
        };
        write_latency(out, &times, queue_ms, e2e_ms)?;
        self.outputs.publish(mi, out);
        m.preprocess.record_ms(times.preprocess_ms);
        m.infer.record_ms(times.infer_ms);
        m.decode.record_ms(times.decode_ms);
        m.end_to_end.record_ms(e2e_ms);
        m.processed.fetch_add(1, Ordering::Relaxed);
        if Instant::now() > p.deadline {
            m.deadline_misses.fetch_add(1, Ordering::Relaxed);
            m.late.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether every worker looped within `within` (the watchdog's
    /// condition for pinging systemd).
    pub fn workers_alive(&self, within: Duration) -> bool {
        let now = self.clock_ms();
        let limit = within.as_millis() as u64;
        self.lanes.iter().all(|l| {
            l.heartbeats
                .iter()
                .all(|h| now.saturating_sub(h.load(Ordering::Relaxed)) <= limit)
        })
    }

    /// Health JSON for `osprey/{robot}/health`.
    pub fn health(&self) -> serde_json::Value {
        let cfg = self.cfg();
        let alive = self.workers_alive(Duration::from_secs(5));
        let models: serde_json::Map<String, serde_json::Value> = cfg
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mm = &self.metrics.models[i];
                let processed = mm.processed.load(Ordering::Relaxed);
                let misses = mm.deadline_misses.load(Ordering::Relaxed);
                let state = if !alive {
                    "stalled"
                } else if mm.received.load(Ordering::Relaxed) == 0 {
                    "idle"
                } else {
                    "serving"
                };
                (
                    m.name.clone(),
                    serde_json::json!({
                        "state": state,
                        "lane": m.lane,
                        "cameras": m.cameras,
                        "deadline_ms": m.deadline_ms,
                        "processed": processed,
                        "deadline_misses": misses,
                        "p99_ms": mm.end_to_end.summary().p99_ms,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "robot": cfg.robot,
            "state": if alive { "ok" } else { "stalled" },
            "uptime_s": self.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
            "models": models,
            "assistant": self.assistant.as_ref().map(|a| serde_json::json!({
                "model": a.cfg.model.display().to_string(),
                "in_flight": a.in_flight.load(Ordering::Relaxed),
                "max_concurrent": a.cfg.max_concurrent,
            })),
        })
    }

    /// Metrics JSON for `osprey/{robot}/metrics`.
    pub fn metrics_json(&self) -> serde_json::Value {
        if let Some(a) = &self.assistant {
            if let Ok(c) = a.core.try_lock() {
                let kv = c.rt.kv();
                let m = &self.metrics;
                m.kv_blocks_total
                    .store(kv.capacity_blocks(), Ordering::Relaxed);
                m.kv_blocks_used.store(
                    kv.capacity_blocks().saturating_sub(kv.free_blocks()),
                    Ordering::Relaxed,
                );
            }
        }
        let cfg = self.cfg();
        self.metrics
            .snapshot(&self.names, [cfg.pools.frame_bytes, cfg.pools.arena_bytes])
    }

    /// Stops taking new work and waits up to `timeout` for accepted frames
    /// and questions to finish; what is left is cancelled (questions get a
    /// final "cancelled" reply). Joins the workers. Returns whether
    /// everything finished in time.
    pub fn drain(&self, timeout: Duration) -> bool {
        for lane in &self.lanes {
            let mut st = lock(&lane.state);
            if st.stop == Stop::Run {
                st.stop = Stop::Drain;
            }
            drop(st);
            lane.cv.notify_all();
        }
        let until = Instant::now() + timeout;
        let mut clean = true;
        for lane in &self.lanes {
            let mut st = lock(&lane.state);
            loop {
                let busy = st.running > 0
                    || st.slots.iter().any(|s| s.pending.is_some())
                    || st.assistant.as_ref().is_some_and(|j| j.ready || j.running);
                if !busy {
                    break;
                }
                let now = Instant::now();
                if now >= until {
                    clean = false;
                    break;
                }
                st = lane
                    .cv
                    .wait_timeout(st, (until - now).min(Duration::from_millis(50)))
                    .map_or_else(|e| e.into_inner().0, |r| r.0);
            }
        }
        self.shutdown();
        if let Some(a) = &self.assistant {
            a.cancel_all();
        }
        clean
    }

    /// Stops the workers at once and joins them.
    pub fn shutdown(&self) {
        for lane in &self.lanes {
            lock(&lane.state).stop = Stop::Now;
            lane.cv.notify_all();
        }
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}
