//! # osprey-models
//!
//! Model families built on the engine:
//!
//! * [`vision`]: camera frames → preprocessed input tensors → detections and
//!   class labels (CenterNet, YOLOv5/v8, classifiers), with the model
//!   description files that say how each model wants its pixels.
//!
//! * [`llm`]: the onboard assistant — GGUF Llama-family models run on their
//!   quantized weights, tokenizer, paged KV cache, sampling.

pub use osprey_engine as engine;

pub mod llm;
pub mod vision;
