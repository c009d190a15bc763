//! Criterion benchmarks of the hot kernels on the layer shapes of the shared
//! models (single thread, so numbers are comparable across machines' core
//! counts). Reports throughput in FLOP (2 per multiply-add).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use osprey_kernels::activation::Activation;
use osprey_kernels::conv::{Conv2d, Conv2dGeometry, ConvTactic};
use osprey_kernels::conv_nhwc::Conv2dNhwc;
use osprey_kernels::qconv::{quantize, QConv2d, QIn, QOut};
use osprey_kernels::qconv_nhwc::QConv2dNhwc;
use osprey_kernels::ThreadPool;

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn conv_case(c: &mut Criterion, group: &str, cases: &[(usize, usize, usize, usize, usize, usize)]) {
    let pool = ThreadPool::new(1);
    let mut g = c.benchmark_group(group);
    for &(cin, cout, hw, k, stride, groups) in cases {
        let geo = Conv2dGeometry {
            c_in: cin,
            h: hw,
            w: hw,
            c_out: cout,
            kh: k,
            kw: k,
            stride: [stride; 2],
            dilation: [1, 1],
            pads: [k / 2; 4],
            groups,
        };
        let w = data(cout * cin / groups * k * k);
        // Every tactic the tuner would time for this layer.
        for tactic in ConvTactic::candidates(&geo) {
            let conv = Conv2d::with_tactic(geo, &w, Some(&data(cout)), Activation::Relu, tactic)
                .expect("conv");
            let (oh, ow) = conv.out_hw();
            let x = data(cin * hw * hw);
            let mut y = vec![0.0; cout * oh * ow];
            let mut scratch = vec![0.0; conv.scratch_len(1)];
            let macs = cout * (cin / groups) * k * k * oh * ow;
            g.throughput(Throughput::Elements(2 * macs as u64));
            let id = format!(
                "{}x{}_{cin}to{cout}_at{hw}_s{stride}_g{groups}/{}",
                k,
                k,
                tactic.name()
            );
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| conv.run(&pool, 1, &x, &mut y, &mut scratch))
            });
        }
        // The channels-last kernel (the layout pass's form of the layer).
        if let Ok(conv) = Conv2dNhwc::new(geo, &w, Some(&data(cout)), Activation::Relu) {
            let (oh, ow) = conv.out_hw();
            let x = data(cin * hw * hw);
            let mut y = vec![0.0; cout * oh * ow];
            let macs = cout * (cin / groups) * k * k * oh * ow;
            g.throughput(Throughput::Elements(2 * macs as u64));
            let id = format!(
                "{k}x{k}_{cin}to{cout}_at{hw}_s{stride}_g{groups}/{}",
                conv.algorithm()
            );
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| conv.run(&pool, 1, &x, None, &mut y))
            });
        }
        // The channels-last INT8 kernel with INT8 tensors in and out (as
        // inside an INT8 channels-last engine).
        let scale = 2.0 / 127.0;
        if let Ok(q) = QConv2dNhwc::new(geo, &w, Some(&data(cout)), Activation::Relu, scale) {
            let (oh, ow) = q.out_hw();
            let x8: Vec<i8> = data(cin * hw * hw)
                .iter()
                .map(|&v| quantize(v, 1.0 / scale) as i8)
                .collect();
            let mut y8 = vec![0i8; cout * oh * ow];
            let mut scratch = vec![0.0; q.scratch_len(1)];
            let macs = cout * (cin / groups) * k * k * oh * ow;
            g.throughput(Throughput::Elements(2 * macs as u64));
            let id = format!(
                "{k}x{k}_{cin}to{cout}_at{hw}_s{stride}_g{groups}/{}-i8",
                q.algorithm()
            );
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| {
                    let out = QOut::I8(&mut y8, 4.0 / 127.0);
                    q.run_io(&pool, 1, QIn::I8(&x8), None, out, &mut scratch)
                })
            });
        }
        // The INT8 kernel, with f32 tensors in and out (quantized while
        // read, dequantized in the epilogue) and with INT8 tensors (as
        // between two INT8 layers).
        let scale = 2.0 / 127.0;
        let Ok(q) = QConv2d::new(geo, &w, Some(&data(cout)), Activation::Relu, scale) else {
            continue;
        };
        let (oh, ow) = q.out_hw();
        let x = data(cin * hw * hw);
        let x8: Vec<i8> = x.iter().map(|&v| quantize(v, 1.0 / scale) as i8).collect();
        let mut y = vec![0.0; cout * oh * ow];
        let mut y8 = vec![0i8; cout * oh * ow];
        let mut scratch = vec![0.0; q.scratch_len(1)];
        let macs = cout * (cin / groups) * k * k * oh * ow;
        g.throughput(Throughput::Elements(2 * macs as u64));
        let id = |io: &str| {
            format!(
                "{k}x{k}_{cin}to{cout}_at{hw}_s{stride}_g{groups}/{}-{io}",
                q.algorithm()
            )
        };
        g.bench_function(BenchmarkId::from_parameter(id("f32")), |b| {
            b.iter(|| q.run(&pool, 1, &x, None, &mut y, &mut scratch))
        });
        g.bench_function(BenchmarkId::from_parameter(id("i8")), |b| {
            b.iter(|| {
                let out = QOut::I8(&mut y8, 4.0 / 127.0);
                q.run_io(&pool, 1, QIn::I8(&x8), None, out, &mut scratch)
            })
        });
        // Non-negative INT8 input, as after a ReLU, in the dot4 form
        // (vpmaddubsw with AVX2, sdot with NEON's dot product).
        let x8r: Vec<i8> = x8.iter().map(|v| v.abs()).collect();
        let qu = q.clone().with_dot4(true);
        g.bench_function(BenchmarkId::from_parameter(id("i8relu")), |b| {
            b.iter(|| {
                let out = QOut::I8(&mut y8, 4.0 / 127.0);
                qu.run_io(&pool, 1, QIn::I8(&x8r), None, out, &mut scratch)
            })
        });
    }
    g.finish();
}

fn activations(c: &mut Criterion) {
    let mut g = c.benchmark_group("activation");
    for act in [
        Activation::Sigmoid,
        Activation::HardSwish,
        Activation::Clip { lo: 0.0, hi: 6.0 },
    ] {
        for len in [16usize, 65536] {
            let mut x = data(len);
            g.throughput(Throughput::Elements(len as u64));
            let name = format!("{act:?}")
                .split([' ', '{'])
                .next()
                .unwrap_or("act")
                .to_string();
            g.bench_function(BenchmarkId::new(name, len), |b| {
                b.iter(|| act.apply_slice(&mut x))
            });
        }
    }
    g.finish();
}

/// The LLM decode kernels on SmolLM2-135M's shapes: one token's 8-bit
/// activations times 4-bit / 8-bit weight matrices (the pooled 4-row
/// kernel against one row at a time), and attention of one query row over
/// 512 cached positions (9 heads, 3 KV heads of 64), f32 and f16 cache.
fn llm(c: &mut Criterion) {
    use osprey_kernels::attention::{attend, scratch_floats, Heads, KvData, PagedKv};
    use osprey_kernels::quant::{
        dot_q8, matmul_q8, matmul_q8_many, quantize, Packed, Q8Act, Q8Product, QuantType,
    };
    let pool = ThreadPool::new(1);
    let mut g = c.benchmark_group("llm-decode");
    for (ty, rows, cols) in [
        (QuantType::Q4_1, 1536, 576),
        (QuantType::Q4_1, 576, 1536),
        (QuantType::Q8_0, 8192, 576),
    ] {
        let w = quantize(ty, &data(rows * cols)).expect("whole blocks");
        let mut xq = Q8Act::with_capacity(1, cols);
        xq.quantize(&data(cols), 1, cols);
        let mut y = vec![0.0; rows];
        g.throughput(Throughput::Elements((2 * rows * cols) as u64));
        let id = format!("{ty:?} {rows}x{cols}");
        g.bench_function(BenchmarkId::new("matmul_q8", &id), |b| {
            b.iter(|| matmul_q8(ty, &w, rows, &xq, &mut y, &pool))
        });
        // The row-interleaved copy the model makes with 8-bit activations
        // (x86 with AVX2 only).
        if let Some(p) = Packed::new(ty, &w, rows, cols) {
            g.bench_function(BenchmarkId::new("matmul_q8 packed", &id), |b| {
                b.iter(|| {
                    let mut product = [Q8Product {
                        ty,
                        w: &w,
                        packed: Some(&p),
                        rows,
                        y: &mut y,
                    }];
                    matmul_q8_many(&mut product, &xq, &pool)
                })
            });
        }
        let rb = ty.row_bytes(cols);
        g.bench_function(BenchmarkId::new("dot_q8 row by row", &id), |b| {
            b.iter(|| {
                for (r, v) in y.iter_mut().enumerate() {
                    *v = dot_q8(ty, &w[r * rb..(r + 1) * rb], &xq, 0);
                }
            })
        });
    }
    let (len, bt, kv_dim, layers) = (512usize, 16usize, 192usize, 1usize);
    let heads = Heads {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let blocks: Vec<u32> = (0..(len / bt) as u32).collect();
    let f32s = data(blocks.len() * layers * 2 * bt * kv_dim);
    let f16s: Vec<half::f16> = f32s.iter().map(|&v| half::f16::from_f32(v)).collect();
    let q = data(9 * 64);
    let mut out = vec![0.0; 9 * 64];
    let mut scratch = vec![0.0; scratch_floats(heads, bt, len)];
    g.throughput(Throughput::Elements((2 * 2 * 9 * 64 * len) as u64));
    for (name, kv) in [("f32", KvData::F32(&f32s)), ("f16", KvData::F16(&f16s))] {
        let paged = PagedKv {
            data: kv,
            blocks: &blocks,
            block_tokens: bt,
            layers,
            layer: 0,
            kv_dim,
            head_dim: 64,
        };
        g.bench_function(BenchmarkId::new("attention 512 positions", name), |b| {
            b.iter(|| attend(&pool, &paged, &q, len, heads, 0.125, &mut out, &mut scratch))
        });
    }
    g.finish();
}

/// The engine's boundary layout conversions: a camera image (3 planes) to
/// channels-last at the input, and a channels-last output back to planes.
fn layouts(c: &mut Criterion) {
    use osprey_kernels::eltwise::MAX_RANK;
    use osprey_kernels::layout::{contiguous_strides, copy_strided, StridedView};
    let mut g = c.benchmark_group("layout");
    for (ch, hw, to_nhwc) in [(3, 224, true), (3, 512, true), (80, 128, false)] {
        let x = data(ch * hw * hw);
        let mut y = vec![0.0; x.len()];
        // The source read in the destination's dimension order.
        let (shape, src) = if to_nhwc {
            ([hw, hw, ch], [hw as isize, 1, (hw * hw) as isize])
        } else {
            ([ch, hw, hw], [1, (hw * ch) as isize, ch as isize])
        };
        let mut strides = [0isize; MAX_RANK];
        strides[..3].copy_from_slice(&src);
        let src = StridedView { offset: 0, strides };
        let dst = StridedView {
            offset: 0,
            strides: contiguous_strides(&shape),
        };
        g.throughput(Throughput::Bytes(8 * x.len() as u64));
        let id = format!(
            "{}_{ch}x{hw}x{hw}",
            if to_nhwc {
                "nchw-to-nhwc"
            } else {
                "nhwc-to-nchw"
            }
        );
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| copy_strided(&shape, &x, &src, &mut y, &dst))
        });
    }
}

fn benches(c: &mut Criterion) {
    layouts(c);
    llm(c);
    activations(c);
    // (c_in, c_out, h=w, kernel, stride, groups)
    conv_case(
        c,
        "pointwise",
        &[
            (16, 96, 112, 1, 1, 1),
            (32, 16, 112, 1, 1, 1),
            (96, 24, 56, 1, 1, 1),
            (112, 672, 14, 1, 1, 1),
            (1152, 320, 7, 1, 1, 1),
            (1152, 192, 7, 1, 1, 1),
            (192, 1152, 7, 1, 1, 1),
            (672, 112, 14, 1, 1, 1),
        ],
    );
    conv_case(
        c,
        "depthwise",
        &[
            (96, 96, 112, 3, 2, 96),
            (144, 144, 56, 3, 1, 144),
            (128, 128, 128, 3, 1, 128),
            (240, 240, 28, 5, 1, 240),
            (144, 144, 56, 5, 2, 144),
            (1152, 1152, 7, 5, 1, 1152),
        ],
    );
    conv_case(
        c,
        "im2col",
        &[
            (3, 32, 224, 3, 2, 1),
            (3, 16, 512, 3, 2, 1),
            (96, 24, 160, 3, 1, 1),
        ],
    );
}

criterion_group! {
    name = kernels;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = benches
}
criterion_main!(kernels);
