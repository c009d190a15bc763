//! Cross-layer fusion of an expansion and its depthwise reader.
//!
//! In an inverted residual block (MobileNet, EfficientNet) a 1×1
//! expansion writes the block's largest tensor and one depthwise layer
//! reads it. Channels-last pairs can run as one step
//! (`Conv2dNhwc::run_expand_depthwise`, or
//! `QConv2dNhwc::run_expand_depthwise` for an INT8 expansion and its FP32
//! depthwise reader): the expanded rows go through a small per-thread ring
//! in L2 instead of memory. In a fused pair the expanded tensor is f32
//! (an FP32 depthwise layer's INT8 read, `ConvAttrs::int8_read_scale`,
//! applies only when it runs on its own). Whether a pair is worth
//! it depends on the shapes and the CPU, so it is a tactic: the tuner times
//! each eligible pair both ways ([`crate::tune`]) and marks the expansion's
//! tactic with [`FUSED_SUFFIX`] where the fused run is faster. The graph
//! is unchanged — the intermediate tensor keeps its place in the memory
//! plan, so a run that observes every tensor (calibration, accuracy
//! reports) runs the pair as two steps and sees it, with the same values
//! bit for bit.

use osprey_kernels::conv_nhwc::Conv2dNhwc;

use crate::int8::runs_int8;
use crate::ir::{Graph, Op};

/// Appended to an expansion's tactic (`nhwc-gemm+dw`) when it runs fused
/// with its depthwise reader.
pub const FUSED_SUFFIX: &str = "+dw";

/// An expansion's tactic (`nhwc-gemm`, `int8-nhwc-gemm-amx`), fused with
/// its depthwise reader.
pub fn fused_tactic(base: &str) -> String {
    format!("{base}{FUSED_SUFFIX}")
}

/// Whether `tactic` asks for the fused form.
pub fn is_fused(tactic: Option<&str>) -> bool {
    tactic.is_some_and(|t| t.ends_with(FUSED_SUFFIX))
}

/// Whether a layer's timing candidate `name` is one of its own kernels,
/// not the timing of a pair with its depthwise reader (`a,b` apart,
/// `a+dw` fused).
pub fn is_own_kernel(name: &str) -> bool {
    !name.contains(',') && !is_fused(Some(name))
}

/// `tactic` without the fused form's suffix: the expansion's own kernel.
pub fn unfused(tactic: &str) -> &str {
    tactic.strip_suffix(FUSED_SUFFIX).unwrap_or(tactic)
}

/// Expanded tensors smaller than this (bytes per image) stay unfused
/// without timing: they live in L2 anyway. EfficientNet-Lite0's 240
/// channels at 28² (752 KB) and 672 at 14² (527 KB) timed faster fused in
/// isolation some of the time and ran slower fused inside the engine
/// (`osprey bench --profile`: 0.247 → 0.261 ms, 0.231 → 0.242 ms).
pub const MIN_FUSED_BYTES: usize = 1024 * 1024;

/// The same bound for a pair whose expansion runs INT8. Such an expansion
/// computes several times faster, so the ring's overheads weigh more, and
/// an expanded tensor a core's L2 holds (2 MB on the Xeon we measure on)
/// is read back from there anyway. On CenterNet (MobileNetV3, 512²) the
/// INT8 pairs at 32² × 384 and 528 channels (1.5 and 2.1 MB) timed faster
/// fused in isolation and ran slower fused inside the engine (`osprey
/// bench --profile`: 0.36 → 0.40 ms, 0.62 → 0.76 ms), while those of 3 MB
/// and more gained (16 MB at 256² × 64: 4.8 → 1.8 ms).
pub const MIN_FUSED_BYTES_INT8: usize = 3 * 1024 * 1024;

/// Node pairs `(expansion, depthwise reader)` that may run as one step,
/// whatever their tactics say: node `i` is a channels-last 1×1
/// convolution (FP32, or INT8 where its tactic runs INT8) without a fused
/// residual, its output is not a graph output
/// and is read only by node `j`, as its data input; `j` is a channels-last
/// FP32 depthwise convolution and the next node that is not a view (so the
/// two are consecutive steps); and the geometries fuse
/// (`Conv2dNhwc::geometries_fuse`).
pub fn fusion_candidates(g: &Graph, tactics: &[Option<String>]) -> Vec<(usize, usize)> {
    let tactic = |i: usize| tactics.get(i).and_then(|t| t.as_deref());
    let mut readers = vec![0usize; g.tensors.len()];
    for node in &g.nodes {
        for &t in &node.inputs {
            if let Some(r) = readers.get_mut(t) {
                *r += 1;
            }
        }
    }
    let fp32_nhwc = |i: usize| match &g.nodes[i].op {
        Op::Conv(a) => a.channels_last && !runs_int8(&g.nodes[i].op, tactic(i)),
        _ => false,
    };
    let mut pairs = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let Op::Conv(a) = &node.op else { continue };
        if !a.channels_last || a.residual {
            continue;
        }
        let (Some(&x), Some(&y)) = (node.inputs.first(), node.outputs.first()) else {
            continue;
        };
        if g.outputs.contains(&y) || readers.get(y) != Some(&1) {
            continue;
        }
        let Some(j) = (i + 1..g.nodes.len()).find(|&j| !g.nodes[j].op.is_view()) else {
            continue;
        };
        let reader = &g.nodes[j];
        let Op::Conv(b) = &reader.op else { continue };
        let Some(&z) = reader.outputs.first() else {
            continue;
        };
        if reader.inputs.first() != Some(&y) || !fp32_nhwc(j) {
            continue;
        }
        let e = a.geometry(&g.tensors[x].shape, &g.tensors[y].shape);
        let d = b.geometry(&g.tensors[y].shape, &g.tensors[z].shape);
        if Conv2dNhwc::geometries_fuse(&e, &d) {
            pairs.push((i, j));
        }
    }
    pairs
}

/// The pairs that run as one step: candidates whose expansion's tactic is
/// the fused form.
pub fn fused_pairs(g: &Graph, tactics: &[Option<String>]) -> Vec<(usize, usize)> {
    fusion_candidates(g, tactics)
        .into_iter()
        .filter(|&(i, _)| is_fused(tactics.get(i).and_then(|t| t.as_deref())))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::exec::{Engine, ExecutionContext};
    use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};

    fn rnd(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        crate::tune::pseudo_random(n, seed)
            .into_iter()
            .map(|v| v * amp)
            .collect()
    }

    /// `x → first (1×1) → y0 → expand (1×1) → a → depthwise (3×3, stride
    /// s) → d → project (1×1) → o`, channels-last; `a` is read again by an
    /// `Add` into `o2` when `shared`. `y0` is read by the expansion only,
    /// so without the fused pair's lifetime rule the planner could put `d`
    /// where `y0` was.
    /// `int8` names (comma-separated) the tensors whose readers may run
    /// INT8 (before the layout pass, as a build permits INT8): one
    /// convolution, and a depthwise reader that may read INT8.
    fn model(c: usize, e: usize, h: usize, s: i64, shared: bool, int8: Option<&str>) -> Graph {
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, c as i64, h as i64, h as i64])
            .init_f32("w0", &[c, c, 1, 1], &rnd(c * c, 1, 0.5))
            .init_f32("w1", &[e, c, 1, 1], &rnd(e * c, 2, 0.4))
            .init_f32("b1", &[e], &rnd(e, 3, 0.2))
            .init_f32("w2", &[e, 1, 3, 3], &rnd(e * 9, 4, 0.4))
            .init_f32("w3", &[c, e, 1, 1], &rnd(c * e, 5, 0.3))
            .node("Conv", &["x", "w0"], &["y0"], vec![])
            .node("Conv", &["y0", "w1", "b1"], &["a"], vec![])
            .node(
                "Conv",
                &["a", "w2"],
                &["d"],
                vec![
                    attr_ints("pads", &[1, 1, 1, 1]),
                    attr_ints("strides", &[s, s]),
                    attr_i("group", e as i64),
                ],
            )
            .node("Conv", &["d", "w3"], &["o"], vec![])
            .output("o");
        if shared {
            b.node("Add", &["a", "a"], &["o2"], vec![]).output("o2");
        }
        let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        if let Some(names) = int8 {
            let scale = |t: &str| names.split(',').any(|n| n == t).then_some(0.02);
            let n = crate::int8::permit_int8(&mut g, &scale, false);
            assert_eq!(n.iter().filter(|l| l.fallback.is_none()).count(), 1);
        }
        crate::passes::channels_last(&mut g);
        g
    }

    fn conv_nodes(g: &Graph) -> Vec<usize> {
        (0..g.nodes.len())
            .filter(|&i| matches!(g.nodes[i].op, Op::Conv(_)))
            .collect()
    }

    /// Runs `engine` on `x` with `threads`; returns the first output and,
    /// observed, tensor `a`.
    fn run(engine: &Arc<Engine>, x: &[f32], threads: usize) -> (Vec<f32>, Vec<f32>) {
        let mut ctx = ExecutionContext::new(engine.clone(), threads);
        ctx.input_mut(0).unwrap().copy_from_slice(x);
        ctx.run().unwrap();
        let out = ctx.output_index(0).unwrap().to_vec();
        let mut a = Vec::new();
        ctx.run_observed(&mut |name, v| {
            if name == "a:nhwc" {
                a = v.to_vec();
            }
        })
        .unwrap();
        assert_eq!(
            ctx.output_index(0).unwrap(),
            &out[..],
            "an observed run differs"
        );
        (out, a)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// A pair marked fused runs as one step with the unfused engine's
    /// results bit for bit (f32 out, and INT8 out where an INT8 projection
    /// reads the depthwise output), and an observed run still sees the
    /// expanded tensor.
    #[test]
    fn a_fused_pair_runs_as_one_step_with_the_same_results() {
        for (s, int8) in [(1, false), (2, false), (1, true)] {
            // With `int8` the projection runs INT8: the depthwise layer
            // writes INT8.
            let g = model(8, 24, 19, s, false, int8.then_some("d"));
            let convs = conv_nodes(&g);
            let pairs = fusion_candidates(&g, &[]);
            assert_eq!(pairs, [(convs[1], convs[2])], "stride {s}");
            let mut tactics = vec![None; g.nodes.len()];
            tactics[convs[1]] = Some(fused_tactic("nhwc-gemm"));
            assert_eq!(fused_pairs(&g, &tactics), pairs);
            let plain = Arc::new(Engine::new(g.clone()).unwrap());
            let fused = Arc::new(Engine::with_tactics(g.clone(), &tactics).unwrap());
            let infos: Vec<String> = (0..fused.step_count())
                .map(|i| fused.step_info(i).unwrap().1)
                .collect();
            assert!(
                infos
                    .iter()
                    .any(|i| i.contains("+dw fused with the next step")),
                "{infos:?}"
            );
            if int8 {
                assert!(infos
                    .iter()
                    .any(|i| i.contains("nhwc-depthwise") && i.contains("out:i8")));
            }
            let x = rnd(8 * 19 * 19, 9, 1.0);
            for threads in [1, 2, 3] {
                let (want, want_a) = run(&plain, &x, threads);
                let (got, got_a) = run(&fused, &x, threads);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "stride {s}, int8 {int8}, {threads} threads"
                );
                assert!(!want_a.is_empty());
                assert_eq!(bits(&got_a), bits(&want_a), "the observed expansion");
            }
        }
    }

    /// An INT8 expansion fuses with its FP32 depthwise reader (both INT8
    /// tile forms): bit for bit the unfused engine's results where the
    /// depthwise layer reads f32. Where it would read INT8 on its own, the
    /// fused pair keeps the tensor f32 (the observed run, which splits the
    /// pair, agrees bit for bit; `run` checks) and the results stay close.
    #[test]
    fn an_int8_expansion_fuses_with_its_depthwise_reader() {
        let info = |e: &Engine| -> Vec<String> {
            (0..e.step_count())
                .map(|i| e.step_info(i).unwrap().1)
                .collect()
        };
        let dw_reads_i8 = |infos: &[String]| {
            infos
                .iter()
                .any(|i| i.contains("nhwc-depthwise") && i.contains("in:i8"))
        };
        for (names, reads_i8) in [("y0", false), ("y0,a", true)] {
            let g = model(8, 24, 19, 1, false, Some(names));
            let convs = conv_nodes(&g);
            assert_eq!(fusion_candidates(&g, &[]), [(convs[1], convs[2])]);
            let plain = Arc::new(Engine::new(g.clone()).unwrap());
            assert_eq!(dw_reads_i8(&info(&plain)), reads_i8, "{:?}", info(&plain));
            for form in ["int8-nhwc-gemm", "int8-nhwc-gemm-amx"] {
                let mut tactics = vec![None; g.nodes.len()];
                tactics[convs[1]] = Some(fused_tactic(form));
                let fused = Arc::new(Engine::with_tactics(g.clone(), &tactics).unwrap());
                let fi = info(&fused);
                assert!(
                    fi.iter()
                        .any(|i| i.contains("int8-nhwc-gemm") && i.contains("+dw fused")),
                    "{fi:?}"
                );
                assert!(!dw_reads_i8(&fi), "{fi:?}");
                let x = rnd(8 * 19 * 19, 9, 1.0);
                for threads in [1, 2, 3] {
                    let (want, _) = run(&plain, &x, threads);
                    let (got, got_a) = run(&fused, &x, threads);
                    assert!(!got_a.is_empty());
                    let what = format!("{names}, {form}, {threads} threads");
                    if reads_i8 {
                        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let err = want
                            .iter()
                            .zip(&got)
                            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(err <= 0.05 * peak, "{what}: {err} of {peak}");
                        assert_ne!(bits(&got), bits(&want), "{what}: the read is gone");
                    } else {
                        assert_eq!(bits(&got), bits(&want), "{what}");
                    }
                }
            }
        }
    }

    /// Pairs whose preconditions do not hold are no candidates, and a fused
    /// tactic on such a layer is refused with the reason.
    #[test]
    fn pairs_that_cannot_fuse_stay_apart() {
        // The expanded tensor has a second reader.
        let g = model(8, 24, 12, 1, true, None);
        assert!(fusion_candidates(&g, &[]).is_empty());
        let convs = conv_nodes(&g);
        let mut tactics = vec![None; g.nodes.len()];
        tactics[convs[1]] = Some(fused_tactic("nhwc-gemm"));
        let err = Engine::with_tactics(g.clone(), &tactics)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot run with its reader"), "{err}");
        // Not channels-last.
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, 4, 6, 6])
            .init_f32("w1", &[8, 4, 1, 1], &rnd(32, 1, 0.5))
            .init_f32("w2", &[8, 1, 3, 3], &rnd(72, 2, 0.5))
            .node("Conv", &["x", "w1"], &["a"], vec![])
            .node(
                "Conv",
                &["a", "w2"],
                &["d"],
                vec![attr_ints("pads", &[1, 1, 1, 1]), attr_i("group", 8)],
            )
            .output("d");
        let g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        assert!(fusion_candidates(&g, &[]).is_empty());
    }

    /// The tuner times an eligible pair both ways (its report lists both),
    /// and the engine built from its choice gives the untuned results.
    #[test]
    fn the_tuner_times_pairs_both_ways() {
        // 64 channels at 64² expanded: 1 MiB, the smallest pair timed.
        let g = model(16, 64, 64, 2, false, None);
        let (tactics, layers) = crate::tune::select_tactics(
            &g,
            1,
            &mut crate::tune::TimingCache::default(),
            &crate::fingerprint::Fingerprint::current(),
            &mut |_, _, _| {},
        )
        .unwrap();
        let convs = conv_nodes(&g);
        let expand = layers.iter().find(|l| l.node == convs[1]).unwrap();
        for way in ["nhwc-gemm+dw", "nhwc-gemm,nhwc-depthwise"] {
            assert!(
                expand.candidates.contains_key(way),
                "{:?}",
                expand.candidates
            );
        }
        assert_eq!(
            is_fused(tactics[convs[1]].as_deref()),
            expand.tactic.ends_with("+dw")
        );
        let x = rnd(16 * 64 * 64, 9, 1.0);
        let plain = Arc::new(Engine::new(g.clone()).unwrap());
        let tuned = Arc::new(Engine::with_tactics(g, &tactics).unwrap());
        assert_eq!(bits(&run(&tuned, &x, 2).0), bits(&run(&plain, &x, 2).0));
    }
}
