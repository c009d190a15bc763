//! Test support shared across crates: small models built in code (a QDQ
//! model) and a counting global allocator for the
//! allocation-free tests. A test file installs it with
//! `#[global_allocator] static GLOBAL: osprey_engine::testing::Counting =
//! osprey_engine::testing::Counting;` and holds a single test, so no other
//! test allocates concurrently. Every thread's allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Forwards to the system allocator; counts while [`allocations_in`] runs.
pub struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations (and reallocations) made, by any thread, while `f` runs.
pub fn allocations_in(f: impl FnOnce()) -> usize {
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCS.load(Ordering::SeqCst)
}

/// An explicitly quantized (QDQ) model: `x [1,3,8,8]` → QuantizeLinear /
/// DequantizeLinear (scale 0.02; INT8 zero point 0, or the given UINT8 zero
/// point) → Conv 3→4, 3×3, pad 1, whose weights are INT8 values
/// `(37·i mod 255) as i8` dequantized per output channel with scales
/// `[0.01, 0.02, 0.005, 0.03]` → `y`.
pub fn qdq_conv_model(zero: Option<u8>) -> Vec<u8> {
    use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};
    let wq: Vec<i8> = (0..4 * 3 * 9).map(|i| ((i * 37) % 255) as i8).collect();
    let mut b = ModelBuilder::new(13);
    b.input("x", &[1, 3, 8, 8])
        .init_f32("xs", &[], &[0.02])
        .init_i8("wq", &[4, 3, 3, 3], &wq)
        .init_f32("ws", &[4], &[0.01, 0.02, 0.005, 0.03])
        .init_i8("wz", &[4], &[0; 4]);
    match zero {
        Some(z) => b.init_u8("xz", &[], &[z]),
        None => b.init_i8("xz", &[], &[0]),
    };
    b.node("QuantizeLinear", &["x", "xs", "xz"], &["xq"], vec![])
        .node("DequantizeLinear", &["xq", "xs", "xz"], &["xd"], vec![])
        .node(
            "DequantizeLinear",
            &["wq", "ws", "wz"],
            &["w"],
            vec![attr_i("axis", 0)],
        )
        .node(
            "Conv",
            &["xd", "w"],
            &["y"],
            vec![attr_ints("pads", &[1, 1, 1, 1])],
        )
        .output("y");
    b.to_bytes()
}
