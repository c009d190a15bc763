//! Vision pipelines: camera frames in, detections and labels out.
//!
//! * [`frame`]: borrowed raw frames (RGB8, BGR8, RGBA8, BGRA8, GRAY8, NV12,
//!   YUYV) and encoded JPEG/PNG.
//! * [`packet`]: the versioned frame wire format (header + payload).
//! * [`resize`] and [`preprocess`]: conversion + resize + normalisation +
//!   layout straight into the engine's input tensor.
//! * [`desc`]: the model description file (`<model>.toml`).
//! * [`decode`]: CenterNet, YOLOv5 and YOLOv8 heads, NMS, classifier top-k.
//! * [`pipeline`]: an engine, a preprocessor and a decoder together.
//! * [`draw`]: labelled boxes on a copy of the image.
//! * [`testing`]: synthetic models built in code, for tests.

pub mod decode;
pub mod desc;
pub mod draw;
pub mod frame;
pub mod packet;
pub mod pipeline;
pub mod preprocess;
pub mod resize;
pub mod testing;

pub use decode::{ClassScore, Detection};
pub use desc::ModelDesc;
pub use frame::{
    decode_image, encode_rgb, read_image, Frame, FrameLimits, PixelFormat, RgbImage, YuvMatrix,
};
pub use pipeline::{Classifier, Detector, StageTimes};
pub use preprocess::{ImageTransform, PreprocessSpec, Preprocessor};

/// Everything that can go wrong between a frame and its results.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// Width or height is zero.
    #[error("frame is empty ({width}x{height})")]
    EmptyFrame {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },
    /// Dimensions exceed the configured limits.
    #[error("frame {width}x{height} exceeds the limit of {max_width}x{max_height}")]
    TooLarge {
        /// Width in pixels (0 when the decoder refused before reporting it).
        width: usize,
        /// Height in pixels.
        height: usize,
        /// Largest accepted width.
        max_width: usize,
        /// Largest accepted height.
        max_height: usize,
    },
    /// Row stride smaller than one row of pixels.
    #[error("{format} frame {width} px wide: stride {stride} is smaller than a row ({min} bytes)")]
    StrideTooSmall {
        /// Pixel format.
        format: PixelFormat,
        /// Width in pixels.
        width: usize,
        /// Given stride.
        stride: usize,
        /// Smallest valid stride.
        min: usize,
    },
    /// Buffer shorter than the format and size need.
    #[error("{format} frame {width}x{height} stride {stride} needs {need} bytes, got {got}")]
    BufferTooShort {
        /// Pixel format.
        format: PixelFormat,
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
        /// Stride in bytes.
        stride: usize,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// Not a pixel format or image encoding osprey reads.
    #[error("unknown encoding: {0}")]
    UnknownEncoding(String),
    /// A JPEG/PNG that does not decode (truncated, corrupt).
    #[error("image does not decode: {0}")]
    Decode(String),
    /// A malformed frame packet header.
    #[error("bad frame packet: {0}")]
    BadPacket(String),
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        error: String,
    },
    /// A model description or preprocessing spec that cannot work.
    #[error("{0}")]
    Spec(String),
    /// The engine's outputs do not fit the decoder.
    #[error("model output does not fit the {decoder} decoder: {detail}")]
    Output {
        /// Decoder name.
        decoder: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] osprey_engine::EngineError),
}
