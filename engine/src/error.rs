//! The engine's error type: one enum, with the node, op and shape in messages.

use osprey_kernels::KernelError;

/// Everything that can go wrong between a model file and its outputs.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bytes are not a decodable ONNX protobuf.
    #[error(
        "not a valid ONNX model (protobuf decode failed: {0}); is the file truncated or corrupt?"
    )]
    Decode(String),
    /// The model uses operators or features osprey does not implement.
    /// Every unsupported node is listed, so a model can be fixed in one round.
    #[error("{count} unsupported node(s): {list}")]
    Unsupported {
        /// How many nodes.
        count: usize,
        /// `op 'X' (node 'n', opset 13)` entries, `; `-separated.
        list: String,
    },
    /// A node whose attributes or input shapes are invalid.
    #[error("node '{node}' ({op}): {msg}")]
    Node {
        /// Node name (or `#index` when unnamed).
        node: String,
        /// ONNX op type.
        op: String,
        /// What is wrong.
        msg: String,
    },
    /// A graph-level problem (missing tensor, cycle, bad opset...).
    #[error("invalid model: {0}")]
    Model(String),
    /// A problem with a tensor handed in at run time.
    #[error("input '{name}': {msg}")]
    Input {
        /// Input name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A kernel refused its parameters.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A file could not be read or written. (The OS error is part of the
    /// message, not a separate `source`, so error chains print it once.)
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// An engine file that cannot be used (corrupt, truncated, tampered,
    /// another format version, or tuned for another device).
    #[error("{path}: {msg}")]
    EngineFile {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A `.npy` file that is malformed or of an unsupported kind.
    #[error("{path}: {msg}")]
    Npy {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

impl EngineError {
    pub(crate) fn model(msg: impl Into<String>) -> Self {
        EngineError::Model(msg.into())
    }
}

/// Result with [`EngineError`].
pub type Result<T> = std::result::Result<T, EngineError>;
