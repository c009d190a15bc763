//! # osprey-kernels
//!
//! Compute primitives and nothing else: this crate knows no graph, no model
//! and no file format. Every fast kernel has a scalar reference beside it and a
//! property test comparing the two over random shapes.
//!
//! | module | what it holds |
//! |---|---|
//! | [`isa`] | CPU feature detection and the active ISA tier (runtime dispatch) |
//! | [`knobs`] | environment overrides, declared once |
//! | [`pool`] | a bounded, reusable thread pool that allocates nothing per job |
//! | [`activation`] | element-wise activations, usable as GEMM/conv epilogues |
//! | [`gemm`] | f32 GEMM: packed weights, AVX2+FMA micro-kernel, scalar reference |
//! | [`int8`] | INT8 dot products and GEMM with exact INT32 accumulation (AVX2, NEON, scalar reference) |
//! | [`conv`] | 2-D convolution: 1x1 as GEMM, depthwise direct, general im2col, transposed |
//! | [`conv_nhwc`] | channels-last convolution: implicit-im2col GEMM reading pixels in place, depthwise across channels |
//! | [`conv_transpose`] | transposed convolution (GEMM + col2im) |
//! | [`depthwise`] | the depthwise plane kernel (padded plane, AVX2 rows) |
//! | [`pooling`] | max/average pooling, global average pooling, mean over axes |
//! | [`eltwise`] | broadcasting binary ops, batch-norm affine |
//! | [`resize`] | nearest and linear resize with ONNX coordinate modes |
//! | [`softmax`] | softmax along one axis |
//! | [`winograd`] | Winograd F(2x2,3x3) convolution (a tactic for 3x3 layers) |
//! | [`layout`] | strided copies: transpose, slice, concat, pad, gather |
//! | [`error`] | the crate's error type |

pub mod activation;
pub mod attention;
pub mod color;
pub mod conv;
pub mod conv_nhwc;
pub mod conv_transpose;
pub mod depthwise;
#[cfg(target_arch = "aarch64")]
pub mod dotprod;
pub mod eltwise;
pub mod error;
pub mod gemm;
pub mod int8;
pub mod isa;
pub mod knobs;
pub mod layout;
pub mod pool;
pub mod pooling;
pub mod qconv;
pub mod qconv_nhwc;
pub mod quant;
pub mod resize;
pub mod softmax;
pub mod winograd;

pub use activation::Activation;
pub use error::KernelError;
pub use isa::Isa;
pub use pool::ThreadPool;
