//! `ospreyd`: start-up, systemd integration, signals.
//!
//! Start-up order: logging → config (a bad one exits 78, EX_CONFIG, which
//! the unit does not restart) → memory lock → models, pools and warm-up →
//! zenoh topics → `READY=1`. Then the main thread waits for signals:
//! SIGTERM/SIGINT drain in-flight work and exit 0, SIGHUP reloads the
//! config and swaps changed engines without touching the subscriptions.
//! A watchdog thread pings systemd at half of `WATCHDOG_USEC` while every
//! lane worker is alive.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use crate::bus::{self, Bus, Keys};
use crate::config::Config;
use crate::sdnotify::Notifier;
use crate::serve::Core;

/// Exit status for a configuration error (sysexits EX_CONFIG); the unit's
/// RestartPreventExitStatus stops systemd from restarting on it.
pub const EX_CONFIG: i32 = 78;

/// ospreyd — the osprey inference daemon.
#[derive(Parser, Debug)]
#[command(
    name = "ospreyd",
    version,
    about = "ospreyd: camera frames in, detections out; technician questions in, streamed answers out — every perception deadline met",
    after_help = "Signals: SIGTERM/SIGINT drain accepted work and exit 0; SIGHUP reloads the config and swaps changed engines.\nUnder systemd (Type=notify) it reports READY=1 after warm-up, STATUS= lines, and pings the watchdog.\nLogs go to journald when started by systemd, to stderr otherwise (OSPREY_LOG=debug for more)."
)]
pub struct Args {
    /// Configuration file (see systemd/ospreyd.toml for every field).
    #[arg(
        long,
        short,
        default_value = "/etc/osprey/ospreyd.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// Check the config (and that every model loads) and exit.
    #[arg(long)]
    pub check: bool,
    /// Demo on this machine: an embedded zenoh peer, the bundled CenterNet
    /// detector, the cached assistant LLM and an internal camera replaying
    /// --images through the real topics. Prints every detections message
    /// as a JSON line, asks one question, ends with a {"summary": ...} line.
    #[arg(long)]
    pub demo: bool,
    /// Demo: folder of images to replay (default ../shared/fixtures/images).
    #[arg(long, value_name = "DIR", requires = "demo")]
    pub images: Option<PathBuf>,
    /// Demo: seconds of camera frames.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub duration: f64,
    /// Demo: camera frames per second.
    #[arg(long, default_value_t = 5.0)]
    pub fps: f64,
    /// Demo: perception deadline after capture, ms.
    #[arg(long, default_value_t = 200)]
    pub deadline_ms: u64,
    /// Demo: the question for the assistant.
    #[arg(
        long,
        default_value = "The robot's front camera sees a dog on the path. What should the robot do?"
    )]
    pub question: String,
    /// Demo: run without the assistant.
    #[arg(long)]
    pub no_assistant: bool,
    /// Demo: ask again each time an answer ends, so the assistant streams
    /// for the whole run (benchmarks).
    #[arg(long, conflicts_with = "no_assistant")]
    pub keep_asking: bool,
    /// Demo: another ONNX model instead of the bundled CenterNet (with
    /// --model-desc).
    #[arg(long, value_name = "M.onnx", requires = "model_desc")]
    pub onnx: Option<PathBuf>,
    /// Demo: the description of --onnx.
    #[arg(long = "model-desc", value_name = "D.toml", requires = "onnx")]
    pub model_desc: Option<PathBuf>,
}

/// Logs to journald when systemd connected stderr to the journal, to
/// stderr through tracing otherwise.
pub fn init_logging() {
    let level = match std::env::var("OSPREY_LOG").as_deref() {
        Ok("trace") => tracing::Level::TRACE,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // tracing events become `log` records (its "log" feature) when no
        // tracing subscriber is installed.
        if let Ok(j) = systemd_journal_logger::JournalLog::new() {
            if j.with_syslog_identifier("ospreyd".into()).install().is_ok() {
                log::set_max_level(match level {
                    tracing::Level::TRACE => log::LevelFilter::Trace,
                    tracing::Level::DEBUG => log::LevelFilter::Debug,
                    tracing::Level::WARN => log::LevelFilter::Warn,
                    tracing::Level::ERROR => log::LevelFilter::Error,
                    _ => log::LevelFilter::Info,
                });
                return;
            }
        }
    }
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // zenoh's own info lines (session open/close, endpoints) only at warn.
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(level)
        .with_target("zenoh", level.min(tracing::Level::WARN));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .with(filter)
        .try_init();
}

/// Locks current and future pages in RAM; a warning when not permitted.
fn lock_memory() {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    match mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        Ok(()) => tracing::info!("memory locked (mlockall)"),
        Err(e) => tracing::warn!(
            "mlockall failed ({e}): pages may be swapped out under memory pressure; raise the memlock limit (LimitMEMLOCK=infinity in the unit) or set pools.lock_memory = false"
        ),
    }
}

/// Runs the daemon; returns the process exit status.
pub fn run(args: Args) -> i32 {
    init_logging();
    if args.demo {
        let opts = crate::demo::DemoOptions {
            images: args.images.clone(),
            duration: args.duration,
            fps: args.fps,
            deadline_ms: args.deadline_ms,
            question: args.question.clone(),
            no_assistant: args.no_assistant,
            keep_asking: args.keep_asking,
            model: args.onnx.clone().zip(args.model_desc.clone()),
        };
        return match crate::demo::run(opts) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("demo: {e:#}");
                1
            }
        };
    }
    // Block the signals we handle before any thread starts, so every
    // thread inherits the mask and only `sigwait` sees them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        tracing::error!("cannot block signals: {e}");
        return 1;
    }
    let notify = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("NOTIFY_SOCKET: {e}");
            return 1;
        }
    };
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("config: {e}");
            let _ = notify.status(&format!("config error: {e}"));
            return EX_CONFIG;
        }
    };
    match serve(args, cfg, &notify, &signals) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            let _ = notify.status(&format!("failed: {e:#}"));
            1
        }
    }
}

fn serve(args: Args, cfg: Config, notify: &Notifier, signals: &SigSet) -> Result<()> {
    let _ = notify.status("loading models and reserving pools");
    if cfg.pools.lock_memory && !args.check {
        lock_memory();
    }
    let keys = Keys::new(&cfg.robot);
    let session = if args.check {
        None
    } else {
        Some(bus::open(&cfg.zenoh)?)
    };
    let outputs: Vec<String> = cfg
        .models
        .iter()
        .map(|m| m.output_name().to_string())
        .collect();
    let out: Arc<dyn crate::serve::Outputs> = match &session {
        Some(s) => bus::outputs(s, &keys, &outputs)?,
        None => Arc::new(NoOutputs),
    };
    let config_path = args.config.clone();
    let (core, report) = Core::start(cfg.clone(), out)?;
    for (i, m) in cfg.models.iter().enumerate() {
        tracing::info!(
            "model {:?} on lane {:?}: {:.2} ms per frame at warm-up, deadline {} ms, cameras {:?}",
            m.name,
            m.lane,
            report.latency_ms[i],
            m.deadline_ms,
            m.cameras
        );
    }
    for (lane, u) in &report.lanes {
        tracing::info!("lane {lane:?}: utilisation {u:.2} at the configured rates");
    }
    for w in &report.warnings {
        tracing::warn!("admission: {w}");
    }
    let [f, a, k] = report.reserved;
    tracing::info!(
        "reserved: frame slots {:.1} MiB, engine contexts {:.1} MiB, KV cache {:.1} MiB",
        f as f64 / (1 << 20) as f64,
        a as f64 / (1 << 20) as f64,
        k as f64 / (1 << 20) as f64
    );
    if args.check {
        core.shutdown();
        println!(
            "{}: OK ({} model(s){}; {} admission warning(s))",
            config_path.display(),
            cfg.models.len(),
            if cfg.assistant.is_some() {
                ", assistant"
            } else {
                ""
            },
            report.warnings.len()
        );
        return Ok(());
    }
    let session = session.context("no zenoh session")?;
    let mut bus = Bus::declare(&session, core.clone())?;
    let status = format!(
        "serving {} model(s){} for robot {}{}",
        cfg.models.len(),
        if cfg.assistant.is_some() {
            " and the assistant"
        } else {
            ""
        },
        cfg.robot,
        if report.warnings.is_empty() {
            String::new()
        } else {
            format!("; {} admission warning(s)", report.warnings.len())
        }
    );
    let _ = notify.ready(&status);
    tracing::info!("{status}");
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = notify.watchdog().map(|period| {
        let c = core.clone();
        let s = stop.clone();
        let n = Notifier::from_env().ok();
        std::thread::spawn(move || {
            let half = period / 2;
            while !s.load(Ordering::Relaxed) {
                // Ping only while every worker is alive: a stuck lane lets
                // systemd restart the daemon.
                if c.workers_alive(period) {
                    if let Some(n) = &n {
                        let _ = n.watchdog_ping();
                    }
                } else {
                    tracing::error!("a lane worker is stuck: not pinging the watchdog");
                }
                let t = std::time::Instant::now();
                while t.elapsed() < half && !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50).min(half));
                }
            }
        })
    });
    loop {
        let sig = signals.wait().context("waiting for signals")?;
        match sig {
            Signal::SIGHUP => {
                let _ = notify.reloading();
                tracing::info!("SIGHUP: reloading {}", config_path.display());
                match Config::load(&config_path).map_err(anyhow::Error::from) {
                    Ok(new) => match core.reload(new) {
                        Ok(notes) if notes.is_empty() => tracing::info!("reload: nothing changed"),
                        Ok(notes) => {
                            for n in notes {
                                tracing::info!("reload: {n}");
                            }
                        }
                        Err(e) => {
                            tracing::error!("reload failed, still serving the old config: {e:#}")
                        }
                    },
                    Err(e) => tracing::error!("reload failed, still serving the old config: {e:#}"),
                }
                let _ = notify.ready(&status);
            }
            _ => {
                tracing::info!("{sig}: draining in-flight work");
                let _ = notify.stopping();
                bus.stop_frames();
                let t = Duration::from_millis(cfg.scheduler.drain_timeout_ms);
                let clean = core.drain(t);
                stop.store(true, Ordering::Relaxed);
                if let Some(w) = watchdog {
                    let _ = w.join();
                }
                drop(bus);
                let _ = zenoh::Wait::wait(session.close());
                if clean {
                    tracing::info!("drained; exiting");
                } else {
                    tracing::warn!(
                        "drain timeout ({} ms) reached; unfinished work was cancelled",
                        cfg.scheduler.drain_timeout_ms
                    );
                }
                return Ok(());
            }
        }
    }
}

struct NoOutputs;
impl crate::serve::Outputs for NoOutputs {
    fn publish(&self, _: usize, _: &[u8]) {}
}

/// `ospreyd` entry point.
pub fn main() -> ! {
    let code = run(Args::parse());
    std::process::exit(code)
}
