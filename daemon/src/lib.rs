//! # osprey-daemon
//!
//! The programs robots run: the `ospreyd` daemon and the `osprey`
//! command-line tool. This crate contains no kernels; it wires the engine
//! and the model families to topics, files, flags and output formats.
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | the `osprey` subcommands: `run`, `bench`, `inspect`, `build`, `detect`, `classify` |
//! | [`doctor`] | `osprey doctor`: deployment checks with fixes |
//! | [`calibrate`] | `osprey calibrate`: INT8 thresholds per tensor, TensorRT-layout cache |
//! | [`build`] | `osprey build`: optimise, tune, write the engine file, report |
//! | [`stats`] | latency statistics (trtexec-style summaries) |
//! | [`chat`] | `osprey chat` / `osprey tokenize`: the onboard assistant |
//! | [`vision`] | `osprey detect` / `osprey classify`: images to boxes and labels |
//! | [`config`] | `ospreyd.toml`: models, assistant, pools, lanes |
//! | [`serve`] | the serving core: latest-wins frame slots, EDF lanes, the assistant job |
//! | [`metrics`] | lock-free counters and latency histograms |
//! | [`bus`] | zenoh topics and session set-up |
//! | [`sdnotify`] | the systemd notify protocol (READY, STATUS, WATCHDOG, STOPPING) |
//! | [`daemon`] | `ospreyd`: start-up, signals, reload, drain |
//! | [`demo`] | `ospreyd --demo`: the whole product on one machine |
//! | [`client`] | `osprey camera`, `watch`, `ask`, `status` |

pub mod build;
pub mod bus;
pub mod calibrate;
pub mod chat;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod int8;
pub mod metrics;
pub mod sdnotify;
pub mod serve;
pub mod stats;
pub mod vision;
