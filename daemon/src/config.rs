//! `ospreyd.toml`: what the daemon runs, where, and within which budgets.
//! Every field is documented in `systemd/ospreyd.toml`; unknown keys are
//! errors, so a typo never silently falls back to a default.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a config was rejected: one line naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// TOML syntax, an unknown key or a wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// Parsed, but inconsistent.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Robot name: the `{robot}` of every topic.
    pub robot: String,
    /// How to join the zenoh network.
    #[serde(default)]
    pub zenoh: ZenohConfig,
    /// Perception models.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// The onboard assistant (optional).
    #[serde(default)]
    pub assistant: Option<AssistantConfig>,
    /// Memory budgets.
    #[serde(default)]
    pub pools: PoolConfig,
    /// Lanes and workers.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
}

/// Zenoh session settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZenohConfig {
    /// `peer`, `client` or `router`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Endpoints to listen on, e.g. `tcp/0.0.0.0:7447`.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Endpoints to connect to, e.g. `tcp/192.168.1.10:7447`.
    #[serde(default)]
    pub connect: Vec<String>,
    /// A zenoh JSON5 config file, loaded first (mode/listen/connect above
    /// override it).
    #[serde(default)]
    pub config_file: Option<PathBuf>,
    /// Multicast scouting for peers on the LAN.
    #[serde(default)]
    pub multicast_scouting: bool,
    /// Zenoh shared memory (frames from publishers on the same host
    /// arrive without a copy through the network stack).
    #[serde(default = "yes")]
    pub shared_memory: bool,
}

impl Default for ZenohConfig {
    fn default() -> Self {
        ZenohConfig {
            mode: default_mode(),
            listen: Vec::new(),
            connect: Vec::new(),
            config_file: None,
            multicast_scouting: false,
            shared_memory: true,
        }
    }
}

/// One perception model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name: the `{model}` of its output topic.
    pub name: String,
    /// Engine file from `osprey build` (preferred: starts instantly).
    #[serde(default)]
    pub engine: Option<PathBuf>,
    /// ONNX model, imported and optimised at start-up (when no engine).
    #[serde(default)]
    pub onnx: Option<PathBuf>,
    /// Model description: input, preprocessing, decoder, labels.
    pub model_desc: PathBuf,
    /// Camera names whose frames this model processes.
    pub cameras: Vec<String>,
    /// Output name (default: the model name):
    /// `osprey/{robot}/perception/{output}/detections`.
    #[serde(default)]
    pub output: Option<String>,
    /// Deadline after the frame's capture time, in milliseconds.
    pub deadline_ms: u64,
    /// Tie-break between equal deadlines: lower runs first.
    #[serde(default)]
    pub priority: i32,
    /// Lane (named in `[scheduler]`) whose workers run this model.
    #[serde(default = "default_lane")]
    pub lane: String,
    /// Expected frame rate per camera, for the admission check.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// Kernel threads per inference (1 keeps one worker on one core).
    #[serde(default = "one")]
    pub threads: usize,
}

impl ModelConfig {
    /// The output topic's `{model}` part.
    pub fn output_name(&self) -> &str {
        self.output.as_deref().unwrap_or(&self.name)
    }
}

/// The onboard assistant.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AssistantConfig {
    /// GGUF model file (or a Hugging Face safetensors directory).
    pub model: PathBuf,
    /// KV cache budget in bytes (reserved at start-up).
    #[serde(default = "default_kv_budget")]
    pub kv_budget_bytes: usize,
    /// Questions answered at once (more are refused with "busy").
    #[serde(default = "default_concurrent")]
    pub max_concurrent: usize,
    /// Longest accepted prompt, in tokens (chat template included).
    #[serde(default = "default_prompt_tokens")]
    pub max_prompt_tokens: usize,
    /// Longest answer, in tokens.
    #[serde(default = "default_answer_tokens")]
    pub max_answer_tokens: usize,
    /// System prompt of the chat template.
    #[serde(default = "default_system")]
    pub system_prompt: String,
    /// Lane whose workers run the decode steps.
    #[serde(default = "default_lane")]
    pub lane: String,
    /// Deadline of one decode step after it becomes ready, ms: how long
    /// perception may keep the assistant waiting between tokens.
    #[serde(default = "default_step_deadline")]
    pub step_deadline_ms: u64,
    /// Kernel threads per decode step.
    #[serde(default = "one")]
    pub threads: usize,
    /// Store the KV cache in half precision: twice the tokens in
    /// kv_budget_bytes, half the bytes attention reads per token.
    #[serde(default)]
    pub kv_f16: bool,
    /// Multiply 4/8-bit weights with activations rounded to 8 bits in
    /// decode steps, as llama.cpp does (faster; logits within ~0.5).
    #[serde(default)]
    pub int8_activations: bool,
}

/// Memory budgets; start-up fails with the pool's name when one is short.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Bytes for all frame slots (each slot holds one packet).
    #[serde(default = "default_frame_pool")]
    pub frame_bytes: usize,
    /// Largest accepted frame packet, bytes (header + payload).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Largest accepted frame side in pixels.
    #[serde(default = "default_max_side")]
    pub max_frame_side: usize,
    /// Bytes for all engine contexts (arenas, inputs, outputs).
    #[serde(default = "default_arena_pool")]
    pub arena_bytes: usize,
    /// Lock all memory (`mlockall`) so the kernel never pages the daemon out.
    #[serde(default = "yes")]
    pub lock_memory: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            frame_bytes: default_frame_pool(),
            max_frame_bytes: default_max_frame(),
            max_frame_side: default_max_side(),
            arena_bytes: default_arena_pool(),
            lock_memory: true,
        }
    }
}

/// Lanes of the scheduler.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// The lanes; each runs earliest-deadline-first over its jobs.
    #[serde(default = "default_lanes")]
    pub lanes: Vec<LaneConfig>,
    /// How long SIGTERM waits for accepted work to finish, ms.
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lanes: default_lanes(),
            drain_timeout_ms: default_drain(),
        }
    }
}

/// One lane.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Name models and the assistant refer to.
    pub name: String,
    /// CPU worker threads.
    #[serde(default = "one")]
    pub cpu_workers: usize,
    /// CUDA streams (needs a GPU and the CUDA backend; 0 on CPU-only
    /// machines).
    #[serde(default)]
    pub cuda_streams: usize,
}

fn default_mode() -> String {
    "peer".into()
}
fn default_lane() -> String {
    "main".into()
}
fn default_lanes() -> Vec<LaneConfig> {
    vec![LaneConfig {
        name: default_lane(),
        cpu_workers: 1,
        cuda_streams: 0,
    }]
}
fn default_fps() -> f64 {
    10.0
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_kv_budget() -> usize {
    64 << 20
}
fn default_concurrent() -> usize {
    2
}
fn default_prompt_tokens() -> usize {
    384
}
fn default_answer_tokens() -> usize {
    256
}
fn default_system() -> String {
    "You are the onboard assistant of a robot. Answer field technicians briefly and precisely."
        .into()
}
fn default_step_deadline() -> u64 {
    250
}
fn default_frame_pool() -> usize {
    128 << 20
}
fn default_max_frame() -> usize {
    1920 * 1080 * 3 + 64
}
fn default_max_side() -> usize {
    4096
}
fn default_arena_pool() -> usize {
    512 << 20
}
fn default_drain() -> u64 {
    5000
}

/// Characters allowed in names that become key-expression chunks.
fn valid_chunk(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; relative paths resolve against
    /// the directory of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (line {})", 1 + text[..s.start].matches('\n').count()))
                    .unwrap_or_default(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for m in &mut self.models {
            m.engine.as_mut().map(fix);
            m.onnx.as_mut().map(fix);
            fix(&mut m.model_desc);
        }
        if let Some(a) = &mut self.assistant {
            fix(&mut a.model);
        }
        self.zenoh.config_file.as_mut().map(fix);
    }

    fn validate(&self) -> Result<(), String> {
        if !valid_chunk(&self.robot) {
            return Err(format!(
                "robot {:?}: use letters, digits, '-', '_' or '.' (it is part of every topic)",
                self.robot
            ));
        }
        if !["peer", "client", "router"].contains(&self.zenoh.mode.as_str()) {
            return Err(format!(
                "zenoh.mode {:?}: expected peer, client or router",
                self.zenoh.mode
            ));
        }
        if self.scheduler.lanes.is_empty() {
            return Err("scheduler.lanes: at least one lane is needed".into());
        }
        let mut lanes = HashSet::new();
        for l in &self.scheduler.lanes {
            if !lanes.insert(l.name.as_str()) {
                return Err(format!("scheduler.lanes: lane {:?} appears twice", l.name));
            }
            if l.cpu_workers == 0 && l.cuda_streams == 0 {
                return Err(format!(
                    "lane {:?}: needs cpu_workers or cuda_streams above 0",
                    l.name
                ));
            }
        }
        let mut names = HashSet::new();
        for m in &self.models {
            let at = format!("model {:?}", m.name);
            if !valid_chunk(&m.name) || !valid_chunk(m.output_name()) {
                return Err(format!(
                    "{at}: names and outputs use letters, digits, '-', '_' or '.'"
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(format!("{at} appears twice"));
            }
            match (&m.engine, &m.onnx) {
                (Some(_), Some(_)) => return Err(format!("{at}: give engine or onnx, not both")),
                (None, None) => return Err(format!("{at}: give engine or onnx")),
                _ => {}
            }
            if m.cameras.is_empty() {
                return Err(format!("{at}: cameras is empty"));
            }
            if let Some(c) = m.cameras.iter().find(|c| !valid_chunk(c)) {
                return Err(format!(
                    "{at}: camera {c:?}: use letters, digits, '-', '_' or '.'"
                ));
            }
            if m.deadline_ms == 0 {
                return Err(format!("{at}: deadline_ms must be above 0"));
            }
            if !(m.fps > 0.0 && m.fps.is_finite()) {
                return Err(format!("{at}: fps must be a positive number"));
            }
            if m.threads == 0 {
                return Err(format!("{at}: threads must be at least 1"));
            }
            if !lanes.contains(m.lane.as_str()) {
                return Err(format!("{at}: lane {:?} is not in scheduler.lanes", m.lane));
            }
        }
        if let Some(a) = &self.assistant {
            if !lanes.contains(a.lane.as_str()) {
                return Err(format!(
                    "assistant: lane {:?} is not in scheduler.lanes",
                    a.lane
                ));
            }
            if a.max_concurrent == 0 || a.max_prompt_tokens == 0 || a.max_answer_tokens == 0 {
                return Err(
                    "assistant: max_concurrent, max_prompt_tokens and max_answer_tokens must be above 0"
                        .into(),
                );
            }
            if a.threads == 0 {
                return Err("assistant: threads must be at least 1".into());
            }
        }
        if self.pools.max_frame_bytes < osprey_models::vision::packet::HEADER_LEN {
            return Err("pools.max_frame_bytes is smaller than a frame header".into());
        }
        Ok(())
    }

    /// The lane config named `name`.
    pub fn lane(&self, name: &str) -> Option<&LaneConfig> {
        self.scheduler.lanes.iter().find(|l| l.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
robot = "rover1"
[zenoh]
mode = "peer"
listen = ["tcp/127.0.0.1:0"]
[[models]]
name = "det"
onnx = "det.onnx"
model_desc = "det.toml"
cameras = ["front", "rear"]
deadline_ms = 100
lane = "perception"
[assistant]
model = "llm.gguf"
lane = "assistant"
[[scheduler.lanes]]
name = "perception"
cpu_workers = 1
[[scheduler.lanes]]
name = "assistant"
"#;

    #[test]
    fn good_config_parses_with_defaults_and_resolved_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/osprey/ospreyd.toml")).unwrap();
        assert_eq!(c.robot, "rover1");
        assert_eq!(
            c.models[0].onnx.as_deref(),
            Some(Path::new("/etc/osprey/det.onnx"))
        );
        assert_eq!(c.models[0].output_name(), "det");
        assert_eq!(c.models[0].fps, 10.0);
        let a = c.assistant.unwrap();
        assert_eq!(a.max_concurrent, 2);
        assert_eq!(c.scheduler.lanes[1].cpu_workers, 1);
        assert!(c.pools.lock_memory);
    }

    #[test]
    fn each_mistake_is_one_line_naming_the_field() {
        let p = Path::new("x.toml");
        let bad = |from: &str, to: &str| {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{from}");
            Config::parse(&text, p).unwrap_err().to_string()
        };
        let e = bad("deadline_ms = 100", "deadline_ms = 100\ndeadline = 3");
        assert!(e.contains("unknown field `deadline`"), "{e}");
        assert!(e.contains("line"), "{e}");
        let e = bad("mode = \"peer\"", "mode = \"mesh\"");
        assert!(e.contains("zenoh.mode"), "{e}");
        let e = bad("lane = \"perception\"", "lane = \"gpu\"");
        assert!(e.contains("lane \"gpu\" is not in scheduler.lanes"), "{e}");
        let e = bad("onnx = \"det.onnx\"", "");
        assert!(e.contains("give engine or onnx"), "{e}");
        let e = bad("robot = \"rover1\"", "robot = \"rover/1\"");
        assert!(e.contains("robot"), "{e}");
        let e = bad("deadline_ms = 100", "deadline_ms = 0");
        assert!(e.contains("deadline_ms"), "{e}");
        let e = bad("cameras = [\"front\", \"rear\"]", "cameras = [\"front/*\"]");
        assert!(e.contains("camera"), "{e}");
        let e = bad("deadline_ms = 100", "deadline_ms = \"fast\"");
        assert!(e.contains("invalid type"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let missing = Config::load(Path::new("/nonexistent/ospreyd.toml")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/ospreyd.toml"));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/ospreyd.toml");
        let c = Config::load(&path).unwrap();
        assert!(!c.models.is_empty());
        assert!(c.assistant.is_some());
    }
}
