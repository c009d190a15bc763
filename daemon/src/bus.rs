//! Zenoh topics: the daemon's side (camera subscriber, detection
//! publishers, the assistant queryable, health and metrics) and the
//! session set-up shared with the client commands.
//!
//! | key expression | direction | payload |
//! |---|---|---|
//! | `osprey/{robot}/camera/{cam}/frame` | in | frame packet ([`osprey_models::vision::packet`]) |
//! | `osprey/{robot}/perception/{model}/detections` | out | JSON (`osprey detect --json` + camera, seq, capture_ns, end-to-end latency) |
//! | `osprey/{robot}/assistant/ask` | queryable | question text in; several JSON replies stream the answer |
//! | `osprey/{robot}/health` | out, 1 Hz; queryable; liveliness token | JSON status per model |
//! | `osprey/{robot}/metrics` | out, 1 Hz; queryable | JSON histograms and counters |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use zenoh::qos::CongestionControl;
use zenoh::Wait;

use crate::config::ZenohConfig;
use crate::serve::{Core, Outputs, Reply};

/// Key expressions of one robot.
#[derive(Debug, Clone)]
pub struct Keys {
    robot: String,
}

impl Keys {
    /// Keys of `robot`.
    pub fn new(robot: &str) -> Keys {
        Keys {
            robot: robot.to_string(),
        }
    }
    /// Frames of camera `cam` (`*` for all).
    pub fn camera(&self, cam: &str) -> String {
        format!("osprey/{}/camera/{cam}/frame", self.robot)
    }
    /// Results of model output `model` (`*` for all).
    pub fn detections(&self, model: &str) -> String {
        format!("osprey/{}/perception/{model}/detections", self.robot)
    }
    /// The assistant's queryable.
    pub fn ask(&self) -> String {
        format!("osprey/{}/assistant/ask", self.robot)
    }
    /// Health.
    pub fn health(&self) -> String {
        format!("osprey/{}/health", self.robot)
    }
    /// Metrics.
    pub fn metrics(&self) -> String {
        format!("osprey/{}/metrics", self.robot)
    }
    /// The camera name in a frame key, if it is one of this robot's.
    pub fn camera_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix("osprey/")?
            .strip_prefix(self.robot.as_str())?
            .strip_prefix("/camera/")?
            .strip_suffix("/frame")
            .filter(|c| !c.is_empty() && !c.contains('/'))
    }
}

fn zerr(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("zenoh: {e}")
}

/// Opens a zenoh session from the daemon's `[zenoh]` settings.
pub fn open(z: &ZenohConfig) -> Result<zenoh::Session> {
    let mut c = match &z.config_file {
        Some(p) => zenoh::Config::from_file(p)
            .map_err(|e| anyhow!("zenoh.config_file {}: {e}", p.display()))?,
        None => zenoh::Config::default(),
    };
    c.insert_json5("mode", &serde_json::to_string(&z.mode)?)
        .map_err(zerr)?;
    if !z.listen.is_empty() {
        c.insert_json5("listen/endpoints", &serde_json::to_string(&z.listen)?)
            .map_err(zerr)?;
    }
    if !z.connect.is_empty() {
        c.insert_json5("connect/endpoints", &serde_json::to_string(&z.connect)?)
            .map_err(zerr)?;
    }
    c.insert_json5(
        "scouting/multicast/enabled",
        if z.multicast_scouting {
            "true"
        } else {
            "false"
        },
    )
    .map_err(zerr)?;
    c.insert_json5(
        "transport/shared_memory/enabled",
        if z.shared_memory { "true" } else { "false" },
    )
    .map_err(zerr)?;
    zenoh::open(c)
        .wait()
        .map_err(|e| anyhow!("zenoh: cannot open a session ({} mode): {e}", z.mode))
}

/// Client settings: `--connect` endpoints (peer mode, no multicast
/// scouting when given).
pub fn open_client(connect: &[String]) -> Result<zenoh::Session> {
    open(&ZenohConfig {
        mode: "peer".into(),
        listen: Vec::new(),
        connect: connect.to_vec(),
        config_file: None,
        multicast_scouting: connect.is_empty(),
        shared_memory: true,
    })
}

struct ZenohOutputs {
    pubs: Vec<zenoh::pubsub::Publisher<'static>>,
}

impl Outputs for ZenohOutputs {
    fn publish(&self, model: usize, payload: &[u8]) {
        if let Some(p) = self.pubs.get(model) {
            if let Err(e) = p.put(payload.to_vec()).wait() {
                tracing::warn!("publishing detections: {e}");
            }
        }
    }
}

/// Detection publishers for `outputs` (config order), declared before the
/// core starts so results have somewhere to go.
pub fn outputs(
    session: &zenoh::Session,
    keys: &Keys,
    outputs: &[String],
) -> Result<Arc<dyn Outputs>> {
    let pubs = outputs
        .iter()
        .map(|o| {
            session
                .declare_publisher(keys.detections(o))
                .congestion_control(CongestionControl::Drop)
                .wait()
                .map_err(zerr)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(ZenohOutputs { pubs }))
}

struct ZReply {
    query: zenoh::query::Query,
}

impl Reply for ZReply {
    fn send(&mut self, payload: &[u8]) {
        let key = self.query.key_expr().clone();
        if let Err(e) = self.query.reply(key, payload.to_vec()).wait() {
            tracing::debug!("assistant reply: {e}");
        }
    }
}

/// Everything the daemon declared; dropping it undeclares.
pub struct Bus {
    frames: Option<zenoh::pubsub::Subscriber<()>>,
    _ask: Option<zenoh::query::Queryable<()>>,
    _status: Vec<zenoh::query::Queryable<()>>,
    _token: zenoh::liveliness::LivelinessToken,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl Bus {
    /// Declares the camera subscriber, the queryables, the liveliness
    /// token, and starts the 1 Hz health/metrics publisher.
    pub fn declare(session: &zenoh::Session, core: Arc<Core>) -> Result<Bus> {
        let keys = Keys::new(&core.robot());
        let k = keys.clone();
        let c = core.clone();
        let frames = session
            .declare_subscriber(keys.camera("*"))
            .callback(move |sample| {
                let Some(cam) = k.camera_of(sample.key_expr().as_str()) else {
                    return;
                };
                let bytes = sample.payload().to_bytes();
                c.ingest(cam, &bytes);
            })
            .wait()
            .map_err(zerr)?;
        let ask = if core.has_assistant() {
            let c = core.clone();
            Some(
                session
                    .declare_queryable(keys.ask())
                    .callback(move |query| {
                        let text = query
                            .payload()
                            .map(|p| p.try_to_string().map(|s| s.into_owned()));
                        match text {
                            Some(Ok(t)) => c.ask(&t, Box::new(ZReply { query })),
                            _ => {
                                let mut r = ZReply { query };
                                r.send(br#"{"error":"send the question as UTF-8 text in the query payload","done":true}"#);
                            }
                        }
                    })
                    .wait()
                    .map_err(zerr)?,
            )
        } else {
            None
        };
        let mut status = Vec::new();
        for (key, which) in [(keys.health(), 0), (keys.metrics(), 1)] {
            let c = core.clone();
            status.push(
                session
                    .declare_queryable(key)
                    .callback(move |query| {
                        let v = if which == 0 {
                            c.health()
                        } else {
                            c.metrics_json()
                        };
                        // `?model=NAME` narrows the answer to one model.
                        let v = match query.parameters().get("model") {
                            None => v,
                            Some(name) => match v["models"].get(name) {
                                Some(m) => serde_json::json!({ "models": { name: m } }),
                                None => {
                                    let msg = serde_json::json!({
                                        "error": format!("unknown model {name:?}; this robot runs {:?}", c.model_names()),
                                    });
                                    let _ = query.reply_err(msg.to_string()).wait();
                                    return;
                                }
                            },
                        };
                        let key = query.key_expr().clone();
                        let _ = query.reply(key, v.to_string()).wait();
                    })
                    .wait()
                    .map_err(zerr)?,
            );
        }
        let token = session
            .liveliness()
            .declare_token(keys.health())
            .wait()
            .map_err(zerr)?;
        let health = session
            .declare_publisher(keys.health())
            .congestion_control(CongestionControl::Drop)
            .wait()
            .map_err(zerr)?;
        let metrics = session
            .declare_publisher(keys.metrics())
            .congestion_control(CongestionControl::Drop)
            .wait()
            .map_err(zerr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let c = core;
        let ticker = std::thread::Builder::new()
            .name("osprey-status".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let _ = health.put(c.health().to_string()).wait();
                    let _ = metrics.put(c.metrics_json().to_string()).wait();
                    for _ in 0..10 {
                        if s.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })?;
        Ok(Bus {
            frames: Some(frames),
            _ask: ask,
            _status: status,
            _token: token,
            stop,
            ticker: Some(ticker),
        })
    }

    /// Stops taking frames (the first step of a drain).
    pub fn stop_frames(&mut self) {
        if let Some(s) = self.frames.take() {
            let _ = s.undeclare().wait();
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camera_names_come_out_of_frame_keys() {
        let k = Keys::new("rover1");
        assert_eq!(k.camera_of(&k.camera("front")), Some("front"));
        assert_eq!(k.camera_of("osprey/rover2/camera/front/frame"), None);
        assert_eq!(k.camera_of("osprey/rover1/camera//frame"), None);
        assert_eq!(k.camera_of("osprey/rover1/camera/a/b/frame"), None);
        assert_eq!(k.camera_of("osprey/rover1/camera/front/info"), None);
        assert_eq!(
            k.detections("det"),
            "osprey/rover1/perception/det/detections"
        );
    }
}
