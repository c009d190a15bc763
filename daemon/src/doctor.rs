//! `osprey doctor`: what matters for a real-time deployment on this machine,
//! each item pass / warn / fail with the fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

/// `osprey doctor` arguments.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also check that this engine file loads on this device.
    #[arg(long, value_name = "M.engine")]
    pub engine: Option<PathBuf>,
    /// Check that a zenoh endpoint (e.g. `tcp/192.168.1.10:7447`) accepts connections.
    #[arg(long, value_name = "ENDPOINT")]
    pub connect: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine for real-time use.
    Pass,
    /// Works, but not as well as it could.
    Warn,
    /// Needs fixing.
    Fail,
    /// Not applicable here.
    Skip,
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when passing).
    pub fix: String,
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Directories the dynamic loader searches (enough for CUDA's usual homes).
fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    for d in [
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu/tegra",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/aarch64-linux/lib",
        "/usr/lib64",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn find_lib(prefix: &str) -> Option<PathBuf> {
    for d in lib_dirs() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                return Some(e.path());
            }
        }
    }
    None
}

fn gpu() -> Check {
    let tegra = Path::new("/etc/nv_tegra_release").exists();
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version").ok();
    let libcuda = find_lib("libcuda.so");
    match (libcuda, driver, tegra) {
        (Some(lib), drv, _) => check(
            "gpu",
            Status::Pass,
            format!(
                "CUDA driver library {}{}",
                lib.display(),
                drv.map(|d| format!("; {}", d.lines().next().unwrap_or("").trim()))
                    .unwrap_or_default()
            ),
            "",
        ),
        (None, _, true) => check(
            "gpu",
            Status::Fail,
            "Jetson (nv_tegra_release present) but libcuda.so not found",
            "install JetPack's CUDA driver (nvidia-l4t-cuda) and check LD_LIBRARY_PATH",
        ),
        (None, _, false) => check(
            "gpu",
            Status::Warn,
            "no CUDA driver found: engines run on the CPU",
            "on a Jetson, install JetPack; elsewhere install the NVIDIA driver if a GPU is present",
        ),
    }
}

fn nvrtc() -> Check {
    match find_lib("libnvrtc.so") {
        Some(p) => check("nvrtc", Status::Pass, format!("{}", p.display()), ""),
        None => check(
            "nvrtc",
            Status::Warn,
            "libnvrtc.so not found: CUDA kernels cannot be compiled here",
            "install cuda-nvrtc (JetPack) or the nvidia-cuda-nvrtc-cu12 wheel and add it to LD_LIBRARY_PATH",
        ),
    }
}

fn memlock() -> Check {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == RLIM_INFINITY => check("memlock", Status::Pass, "unlimited", ""),
        Ok((soft, _)) if soft >= 1 << 30 => check("memlock", Status::Pass, format!("{} MiB", soft >> 20), ""),
        Ok((soft, _)) => check(
            "memlock",
            Status::Warn,
            format!("{} KiB: memory pools cannot be locked, pages may be swapped or faulted", soft >> 10),
            "set LimitMEMLOCK=infinity in the service unit, or `ulimit -l unlimited` in the shell that starts osprey",
        ),
        Err(e) => check("memlock", Status::Warn, format!("cannot read: {e}"), ""),
    }
}

fn governor() -> Check {
    let mut govs = std::collections::BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir("/sys/devices/system/cpu") {
        for e in rd.flatten() {
            let p = e.path().join("cpufreq/scaling_governor");
            if let Ok(g) = std::fs::read_to_string(p) {
                govs.insert(g.trim().to_string());
            }
        }
    }
    if govs.is_empty() {
        return check(
            "cpu governor",
            Status::Skip,
            "no cpufreq information (VM or container)",
            "",
        );
    }
    let list: Vec<String> = govs.iter().cloned().collect();
    if govs.iter().all(|g| g == "performance") {
        check("cpu governor", Status::Pass, "performance", "")
    } else {
        check(
            "cpu governor",
            Status::Warn,
            list.join(", "),
            "latency varies with frequency scaling: `sudo nvpmodel -m 0 && sudo jetson_clocks` on Jetson, or set scaling_governor to performance",
        )
    }
}

fn realtime() -> Check {
    use nix::sys::resource::{getrlimit, Resource};
    let root = nix::unistd::geteuid().is_root();
    match getrlimit(Resource::RLIMIT_RTPRIO) {
        _ if root => check("realtime scheduling", Status::Pass, "running as root", ""),
        Ok((soft, _)) if soft > 0 => check(
            "realtime scheduling",
            Status::Pass,
            format!("RLIMIT_RTPRIO {soft}"),
            "",
        ),
        Ok(_) => check(
            "realtime scheduling",
            Status::Warn,
            "RLIMIT_RTPRIO is 0: worker threads cannot use SCHED_FIFO",
            "set LimitRTPRIO=99 (or CPUSchedulingPolicy=fifo) in the service unit",
        ),
        Err(e) => check(
            "realtime scheduling",
            Status::Warn,
            format!("cannot read: {e}"),
            "",
        ),
    }
}

fn zenoh(endpoint: Option<&str>) -> Check {
    let Some(ep) = endpoint else {
        return check("zenoh", Status::Skip, "no --connect endpoint given", "");
    };
    let addr = ep.strip_prefix("tcp/").unwrap_or(ep);
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()
        .and_then(|mut a| a.next());
    match resolved {
        None => check(
            "zenoh",
            Status::Fail,
            format!("cannot resolve {ep}"),
            "use tcp/HOST:PORT (default port 7447)",
        ),
        Some(sa) => match std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
            Ok(_) => check(
                "zenoh",
                Status::Pass,
                format!("{ep} accepts connections"),
                "",
            ),
            Err(e) => check(
                "zenoh",
                Status::Fail,
                format!("{ep}: {e}"),
                "start the zenoh router/peer there, or check the address and firewall",
            ),
        },
    }
}

fn engine(path: Option<&Path>) -> Check {
    let Some(p) = path else {
        return check("engine/device match", Status::Skip, "no --engine given", "");
    };
    let here = osprey_engine::fingerprint::Fingerprint::current();
    match osprey_engine::file::load(p, Some(&here)) {
        Ok(ef) => check(
            "engine/device match",
            Status::Pass,
            format!(
                "{} built for {} ({})",
                p.display(),
                ef.fingerprint.describe(),
                ef.precision.name()
            ),
            "",
        ),
        Err(e) => check(
            "engine/device match",
            Status::Fail,
            e.to_string(),
            "rebuild it here with `osprey build`",
        ),
    }
}

/// Runs every check.
pub fn checks(a: &DoctorArgs) -> Vec<Check> {
    let isa = osprey_kernels::isa::active();
    let cpu = check(
        "cpu kernels",
        if isa == osprey_kernels::Isa::Scalar {
            Status::Warn
        } else {
            Status::Pass
        },
        format!(
            "{} ISA tier; features {}",
            isa.name(),
            osprey_kernels::isa::cpu_features().join(",")
        ),
        if isa == osprey_kernels::Isa::Scalar {
            "no SIMD tier active: check OSPREY_ISA"
        } else {
            ""
        },
    );
    vec![
        gpu(),
        nvrtc(),
        cpu,
        memlock(),
        governor(),
        realtime(),
        zenoh(a.connect.as_deref()),
        engine(a.engine.as_deref()),
    ]
}

/// `osprey doctor`: prints the checks; fails (exit 1) if any check fails.
pub fn doctor(a: DoctorArgs) -> Result<()> {
    let results = checks(&a);
    if a.json {
        println!("{}", serde_json::json!({ "checks": results }));
    } else {
        for c in &results {
            let tag = match c.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            println!("[{tag}] {:<22} {}", c.name, c.detail);
            if !c.fix.is_empty() {
                println!("       {:<22} fix: {}", "", c.fix);
            }
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.name)
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("{} check(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
