//! The kernels' error type.

/// Errors a kernel can report while being prepared (never while running).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A parameter combination the kernel does not implement.
    #[error("{kernel}: unsupported parameters: {detail}")]
    Unsupported {
        /// Kernel name.
        kernel: &'static str,
        /// What was asked for.
        detail: String,
    },
    /// A buffer is smaller than the shape it must hold.
    #[error("{kernel}: buffer too small: need {need} elements, have {have}")]
    BufferTooSmall {
        /// Kernel name.
        kernel: &'static str,
        /// Elements needed.
        need: usize,
        /// Elements given.
        have: usize,
    },
    /// The environment asked for something invalid.
    #[error("invalid value {value:?} for {knob}: {expected}")]
    BadKnob {
        /// Variable name.
        knob: &'static str,
        /// Value seen.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
}
