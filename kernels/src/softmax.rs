//! Softmax along one axis of a tensor viewed as `[outer, axis, inner]`.

use crate::pool::{SyncPtr, ThreadPool};

/// `y = softmax(x)` along the middle dimension of `[outer, axis, inner]`.
pub fn softmax(
    pool: &ThreadPool,
    outer: usize,
    axis: usize,
    inner: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let n = outer * axis * inner;
    assert!(x.len() >= n && y.len() >= n);
    if n == 0 {
        return;
    }
    let y_ptr = SyncPtr::new(y);
    let lanes = outer * inner;
    let per_task = (16 * 1024 / axis.max(1)).max(1);
    let task = |t: usize, _slot: usize| {
        for lane in t * per_task..((t + 1) * per_task).min(lanes) {
            let (o, i) = (lane / inner, lane % inner);
            let base = o * axis * inner + i;
            let mut m = f32::NEG_INFINITY;
            for a in 0..axis {
                m = m.max(x[base + a * inner]);
            }
            let mut s = 0.0f32;
            for a in 0..axis {
                let e = (x[base + a * inner] - m).exp();
                // SAFETY: each lane's elements are written by one task only.
                unsafe { *y_ptr.add(base + a * inner) = e };
                s += e;
            }
            let inv = 1.0 / s;
            for a in 0..axis {
                // SAFETY: as above.
                unsafe { *y_ptr.add(base + a * inner) *= inv };
            }
        }
    };
    pool.run(lanes.div_ceil(per_task), &task);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one_and_match_reference() {
        let x: Vec<f32> = (0..2 * 5 * 3)
            .map(|i| (i as f32 * 0.37).sin() * 10.0)
            .collect();
        let mut y = vec![0.0; x.len()];
        softmax(&ThreadPool::new(2), 2, 5, 3, &x, &mut y);
        for o in 0..2 {
            for i in 0..3 {
                let idx = |a: usize| o * 15 + a * 3 + i;
                let denom: f64 = (0..5).map(|a| (x[idx(a)] as f64).exp()).sum();
                for a in 0..5 {
                    let want = (x[idx(a)] as f64).exp() / denom;
                    assert!((y[idx(a)] as f64 - want).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let x = [1000.0f32, 1000.0];
        let mut y = [0.0; 2];
        softmax(&ThreadPool::new(1), 1, 2, 1, &x, &mut y);
        assert_eq!(y, [0.5, 0.5]);
    }
}
