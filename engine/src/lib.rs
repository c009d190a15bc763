//! # osprey-engine
//!
//! From a model file to outputs: ONNX import into a typed IR, static shape
//! inference and constant folding, memory planning into one arena, and
//! execution contexts that run the plan without allocating. This crate knows
//! no zenoh, no images and no tokenizer.
//!
//! | module | what it holds |
//! |---|---|
//! | [`onnx`] | protobuf decode (generated from the official `onnx.proto`), import, a model builder for tests |
//! | [`ir`] | the typed graph: tensors, nodes, the op enum, validation |
//! | [`passes`] | graph optimisation passes (BN folding, conv epilogue fusion, dead nodes) |
//! | [`plan`] | tensor lifetimes and arena placement |
//! | [`exec`] | prepared engines and execution contexts |
//! | [`tune`] | tactic selection by timing, and the timing cache |
//! | [`file`] | the engine file format (safetensors + JSON plan) |
//! | [`fingerprint`] | the device an engine was tuned for |
//! | [`fuse`] | which expansion → depthwise pairs run as one step |
//! | [`int8`] | which convolutions run INT8 (calibrated input scale), fallback, SQNR |
//! | [`npy`] | reading and writing `.npy` tensors |
//! | [`error`] | [`EngineError`] |

pub mod error;
pub mod exec;
pub mod file;
pub mod fingerprint;
pub mod fuse;
pub mod int8;
pub mod ir;
pub mod npy;
pub mod onnx;
pub mod passes;
pub mod plan;
pub mod testing;
pub mod tune;

pub use error::{EngineError, Result};
pub use exec::{Engine, ExecutionContext};
pub use ir::Graph;
