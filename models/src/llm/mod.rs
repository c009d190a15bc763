//! The onboard assistant: a Llama-family decoder run straight from a GGUF
//! file (quantized weights used in place), its tokenizer, a paged KV
//! cache, sampling and a step API.
//!
//! * [`gguf`]: the file reader (memory-mapped, hostile-input safe).
//! * [`hf`]: Hugging Face checkpoint directories (config.json,
//!   safetensors shards, tokenizer.json).
//! * [`tokenizer`]: byte-level BPE from the GGUF vocabulary, chat template,
//!   streaming UTF-8 decoding.
//! * [`model`]: hyper-parameters from metadata, weights, the forward pass.
//! * [`kv`]: the paged KV cache.
//! * [`sample`]: greedy / temperature / top-k / top-p / repetition penalty.
//! * [`runtime`]: the step API (prefill, batched decode steps, cancel) and
//!   speculative decoding by prompt lookup.

pub mod gguf;
pub mod hf;
pub mod kv;
pub mod model;
pub mod runtime;
pub mod sample;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;

/// Everything that can go wrong loading or running the LLM.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        error: String,
    },
    /// A malformed or lying GGUF file.
    #[error("GGUF: {0}")]
    Gguf(String),
    /// The model is not one this runtime runs (architecture, shapes).
    #[error("model: {0}")]
    Model(String),
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt or generation longer than the context window.
    #[error("{tokens} tokens exceed the context window of {context}")]
    ContextFull {
        /// Tokens the sequence would hold.
        tokens: usize,
        /// The model's (or configured) context length.
        context: usize,
    },
    /// The KV cache budget is used up.
    #[error("KV cache full: the sequence needs {need} more blocks of {block_tokens} tokens, {free} free (budget {budget_bytes} bytes); raise the KV budget or end other sequences")]
    KvFull {
        /// Blocks needed.
        need: usize,
        /// Blocks free.
        free: usize,
        /// Tokens per block.
        block_tokens: usize,
        /// The configured budget.
        budget_bytes: usize,
    },
    /// Bad request (unknown sequence, bad sampling parameters).
    #[error("{0}")]
    Request(String),
}
