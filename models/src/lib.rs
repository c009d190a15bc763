//! # osprey-models
//!
//! Model families built on the engine. This crate is the home of the vision
//! pipelines (frame formats, preprocessing, detector/classifier decode) and
//! the LLM runtime; both arrive with their own issues. Today it only
//! re-exports the engine so dependants can already name it.

pub use osprey_engine as engine;
