//! The systemd notify protocol: datagrams like `READY=1` or
//! `WATCHDOG=1` to the unix socket named by `NOTIFY_SOCKET` (a path, or
//! `@name` for the abstract namespace). Without the variable every call is
//! a no-op, so the daemon runs the same outside systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notify socket (or nothing).
#[derive(Debug)]
pub struct Notifier {
    sock: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment: `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`.
    pub fn from_env() -> std::io::Result<Notifier> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Notifier::new(
            socket.as_deref().and_then(|s| s.to_str()),
            usec.as_deref(),
            pid.as_deref(),
        )
    }

    /// From explicit values (tests).
    pub fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> std::io::Result<Notifier> {
        let sock = match socket {
            None | Some("") => None,
            Some(path) => {
                let addr = if let Some(name) = path.strip_prefix('@') {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?
                } else {
                    std::os::unix::net::SocketAddr::from_pathname(path)?
                };
                Some((UnixDatagram::unbound()?, addr))
            }
        };
        // The watchdog is ours only when WATCHDOG_PID is unset or names us.
        let ours = watchdog_pid
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = watchdog_usec
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Ok(Notifier { sock, watchdog })
    }

    /// Whether a notify socket is configured.
    pub fn enabled(&self) -> bool {
        self.sock.is_some()
    }

    /// The watchdog timeout systemd set, if any; ping at half of it.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (several `KEY=value` lines); errors are returned,
    /// not fatal.
    pub fn notify(&self, msg: &str) -> std::io::Result<()> {
        if let Some((s, addr)) = &self.sock {
            s.send_to_addr(msg.as_bytes(), addr)?;
        }
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> std::io::Result<()> {
        self.notify(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ))
    }

    /// `STATUS=...`.
    pub fn status(&self, status: &str) -> std::io::Result<()> {
        self.notify(&format!("STATUS={status}"))
    }

    /// `WATCHDOG=1`.
    pub fn watchdog_ping(&self) -> std::io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) -> std::io::Result<()> {
        self.notify("STOPPING=1\nSTATUS=draining in-flight work")
    }

    /// `RELOADING=1` with the monotonic time systemd asks for.
    pub fn reloading(&self) -> std::io::Result<()> {
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={ts}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("osprey-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(path.to_str(), Some("2000000"), None).unwrap();
        assert!(n.enabled());
        assert_eq!(n.watchdog(), Some(Duration::from_secs(2)));
        n.ready("serving 1 model").unwrap();
        let got = recv(&server);
        assert!(
            got.starts_with("READY=1\nSTATUS=serving 1 model\nMAINPID="),
            "{got}"
        );
        n.watchdog_ping().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.stopping().unwrap();
        assert!(recv(&server).starts_with("STOPPING=1"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn abstract_sockets_and_foreign_watchdogs() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("osprey-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // WATCHDOG_PID names another process: the watchdog is not ours.
        let n = Notifier::new(Some(&format!("@{name}")), Some("1000"), Some("1")).unwrap();
        assert_eq!(n.watchdog(), None);
        n.status("warming up").unwrap();
        assert_eq!(recv(&server), "STATUS=warming up");
        // No socket: a silent no-op.
        let off = Notifier::new(None, None, None).unwrap();
        assert!(!off.enabled());
        off.ready("x").unwrap();
    }
}
