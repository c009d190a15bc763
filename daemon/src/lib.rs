//! # osprey-daemon
//!
//! The programs robots run: the `osprey` command-line tool (and, with the
//! daemon issue, `ospreyd`). This crate contains no kernels; it wires the
//! engine to files, flags and output formats.
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | the `osprey` subcommands: `run`, `bench`, `inspect`, `build`, `detect`, `classify` |
//! | [`doctor`] | `osprey doctor`: deployment checks with fixes |
//! | [`build`] | `osprey build`: optimise, tune, write the engine file, report |
//! | [`stats`] | latency statistics (trtexec-style summaries) |
//! | [`chat`] | `osprey chat` / `osprey tokenize`: the onboard assistant |
//! | [`vision`] | `osprey detect` / `osprey classify`: images to boxes and labels |

pub mod build;
pub mod chat;
pub mod cli;
pub mod doctor;
pub mod stats;
pub mod vision;
