//! `osprey`: the command-line tool. All logic lives in `osprey_daemon::cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = osprey_daemon::cli::Cli::parse();
    match osprey_daemon::cli::main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole context chain, outermost first.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so `osprey inspect ... | head` would panic on the
/// closed pipe; a command-line tool should just stop, as `ls` does.
fn restore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: FFI call made once at start-up, before any other thread
    // exists; the default disposition installs no Rust handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
