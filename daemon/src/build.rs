//! `osprey build`: ONNX in, one engine file out, with a build report.
//!
//! Steps: import (shape inference, constant folding) → optimisation passes →
//! optional FP16 rounding of the weights → tactic timing on this device
//! (with a progress bar and an optional timing cache) → memory plan → file.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use osprey_engine::file::{self, EngineFile, Precision};
use osprey_engine::fingerprint::Fingerprint;
use osprey_engine::onnx::import_file;
use osprey_engine::tune::{select_tactics, TimingCache};
use osprey_engine::{passes, Engine};
use serde_json::json;

use crate::cli::{default_threads, human_bytes, parse_shapes, BuildArgs, LayoutArg, PrecisionArg};

/// Runs `osprey build`.
pub fn build(a: BuildArgs) -> Result<()> {
    let t0 = Instant::now();
    let threads = match a.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => default_threads(),
    };
    // Fail before minutes of tuning, not after.
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("{}: output directory does not exist", dir.display());
        }
    }
    let mut shapes = parse_shapes(&a.input_shapes)?;
    for (k, v) in crate::int8::desc_shapes(&a.int8)? {
        shapes.entry(k).or_insert(v);
    }
    if a.precision != PrecisionArg::Int8 && a.int8.calib.is_some() {
        bail!("--calib applies to --precision int8");
    }
    let mut graph =
        import_file(&a.onnx, &shapes).map_err(|e| crate::cli::with_model_context(e, &a.onnx))?;
    let nodes_imported = graph.nodes.len();
    let passes_report = passes::optimize(&mut graph);
    let nodes_fused = graph.nodes.len();
    let precision = match a.precision {
        PrecisionArg::Fp32 => Precision::Fp32,
        PrecisionArg::Fp16 => Precision::Fp16,
        PrecisionArg::Int8 => Precision::Int8,
    };
    let mut int8 = if precision == Precision::Int8 {
        Some(crate::int8::prepare(&mut graph, &a.int8, threads, a.json)?)
    } else {
        None
    };
    if precision == Precision::Fp16 {
        file::round_constants_to_f16(&mut graph);
    }

    let fp = Fingerprint::current();
    let mut cache = match &a.timing_cache {
        Some(p) => TimingCache::load(p)?,
        None => TimingCache::new(),
    };
    if let (Some(p), n @ 1..) = (&a.timing_cache, cache.discarded) {
        if !a.json {
            eprintln!(
                "note: timing cache {} was written by another osprey build ({n} entries): every layer is timed again and the file rewritten",
                p.display()
            );
        }
    }
    let discarded = cache.discarded;
    // The layouts to build: NCHW, channels-last, or both to race.
    let layouts: Vec<bool> = match (a.layout, precision) {
        (LayoutArg::Nchw, _) => vec![false],
        (LayoutArg::Nhwc, _) => vec![true],
        (LayoutArg::Auto, _) => vec![false, true],
    };
    let mut built = Vec::new();
    let mut layout_report = None;
    for &nhwc in &layouts {
        let mut g = graph.clone();
        if nhwc {
            let r = passes::channels_last(&mut g);
            layout_report = Some(r);
            if r.converted == 0 && layouts.len() > 1 {
                // Nothing runs channels-last: the same engine as NCHW.
                continue;
            }
        }
        let label = if nhwc { "tuning nhwc" } else { "tuning" };
        let (tactics, layers) = tune(&g, threads, &mut cache, &fp, label)?;
        built.push((nhwc, g, tactics, layers));
    }
    // Race the layouts on this device: alternating rounds, median each.
    let mut race = None;
    if built.len() == 2 {
        let engines = built
            .iter()
            .map(|(_, g, t, _)| Engine::with_tactics(g.clone(), t).map(std::sync::Arc::new))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let (ms, ratio) = race_engines(&engines, threads)?;
        let pick = usize::from(ratio < 1.0);
        race = Some(ms);
        built.swap(0, pick);
    }
    let Some((nhwc, graph, tactics, layers)) = built.into_iter().next() else {
        bail!("internal: no layout was built");
    };
    let layout_json = json!({
        "layout": if nhwc { "nhwc" } else { "nchw" },
        "requested": format!("{:?}", a.layout).to_lowercase(),
        "channels_last": layout_report,
        "race_ms": race.as_ref().map(|ms| json!({"nchw": ms[0], "nhwc": ms[1]})),
    });
    let (tactics, layers) = if a.int8.strict {
        crate::int8::force_int8(&graph, tactics, layers)
    } else {
        (tactics, layers)
    };
    if let Some(p) = &a.timing_cache {
        cache.save(p)?;
    }
    // The accuracy report describes the engine written: its layout and the
    // kernels tuning chose.
    if let Some(o) = int8.as_mut() {
        crate::int8::measure_engine(o, &graph, &tactics, threads, a.json)?;
    }

    let engine = Engine::with_tactics(graph.clone(), &tactics)?;
    let plan = engine.memory_plan();
    let hits = layers.iter().filter(|l| l.cached).count();
    let build_ms = t0.elapsed().as_secs_f64() * 1e3;
    let report = json!({
        "model": a.onnx.display().to_string(),
        "engine": a.out.display().to_string(),
        "precision": precision.name(),
        "threads": threads,
        "device": fp,
        "nodes_imported": nodes_imported,
        "nodes_after_fusion": nodes_fused,
        "passes": passes_report.iter().map(|p| json!({"pass": p.name, "rewrites": p.rewrites})).collect::<Vec<_>>(),
        "layers": layers,
        "arena_bytes": plan.arena_bytes(),
        "naive_bytes": plan.naive_bytes(),
        "timing_cache": {"hits": hits, "misses": layers.len() - hits, "discarded": discarded},
        "layout": layout_json,
    });
    let mut report = report;
    if let Some(o) = &int8 {
        let r = crate::int8::report_json(o);
        if let Some(path) = &a.int8.report {
            std::fs::write(path, serde_json::to_string_pretty(&r)?)
                .with_context(|| path.display().to_string())?;
        }
        report["int8"] = r;
    }
    let ef = EngineFile {
        graph,
        tactics,
        fingerprint: fp.clone(),
        precision,
        build: report.clone(),
    };
    let bytes = file::save(&a.out, &ef)?;
    let build_ms_total = t0.elapsed().as_secs_f64() * 1e3;
    report["engine_bytes"] = json!(bytes);
    report["build_ms"] = json!(build_ms_total);
    let _ = build_ms;

    if a.json {
        println!("{report}");
        return Ok(());
    }
    println!("osprey build  {} -> {}", a.onnx.display(), a.out.display());
    println!("  device      {}  ({threads} threads)", fp.describe());
    println!("  precision   {}", precision.name());
    match (layout_report, &race) {
        (Some(r), Some(ms)) => println!(
            "  layout      {} (timed: nchw {:.2} ms, nhwc {:.2} ms; nhwc converts {} nodes with {} transposes)",
            if nhwc { "nhwc" } else { "nchw" },
            ms[0],
            ms[1],
            r.converted,
            r.transposes
        ),
        (Some(r), None) if nhwc => println!(
            "  layout      nhwc ({} nodes channels-last, {} transposes, {} free views)",
            r.converted, r.transposes, r.views
        ),
        (Some(_), None) => println!("  layout      nchw (nothing here runs channels-last)"),
        _ => println!("  layout      nchw"),
    }
    let applied: Vec<String> = passes_report
        .iter()
        .filter(|p| p.rewrites > 0)
        .map(|p| format!("{} x{}", p.name, p.rewrites))
        .collect();
    println!(
        "  nodes       {nodes_imported} imported -> {nodes_fused} after fusion ({})",
        if applied.is_empty() {
            "nothing fused".to_string()
        } else {
            applied.join(", ")
        }
    );
    println!(
        "  layers      {} tuned ({hits} from the timing cache)",
        layers.len()
    );
    println!("    {:>8}  {:<26} {:<40} name", "ms", "tactic", "fused op");
    for l in &layers {
        println!(
            "    {:>8.3}  {:<26} {:<40} {}{}",
            l.ms,
            l.tactic,
            l.op,
            l.name,
            if l.cached { "  (cached)" } else { "" }
        );
    }
    println!(
        "  arena       {} (naive {})",
        human_bytes(plan.arena_bytes()),
        human_bytes(plan.naive_bytes())
    );
    if let Some(o) = &int8 {
        crate::int8::print_summary(o);
    }
    println!("  engine      {} written", human_bytes(bytes as usize));
    println!("  build time  {:.2} s", build_ms_total / 1e3);
    Ok(())
}

/// Tunes one graph's tactics with a progress bar labelled `label`.
fn tune(
    g: &osprey_engine::ir::Graph,
    threads: usize,
    cache: &mut TimingCache,
    fp: &Fingerprint,
    label: &str,
) -> Result<(
    osprey_engine::tune::Tactics,
    Vec<osprey_engine::tune::LayerChoice>,
)> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} layers  {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let r = select_tactics(g, threads, cache, fp, &mut |done, total, name| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    })?;
    bar.finish_and_clear();
    Ok(r)
}

/// Times two engines on pseudo-random inputs in alternating rounds after a
/// warm-up: each one's median inference time (ms), and the median over
/// rounds of the second's time over the first's (runs milliseconds apart,
/// so a drifting host cancels out: the pick).
fn race_engines(engines: &[std::sync::Arc<Engine>], threads: usize) -> Result<(Vec<f64>, f64)> {
    let mut ctxs = Vec::new();
    for e in engines {
        let mut ctx = osprey_engine::ExecutionContext::new(e.clone(), threads);
        let inputs: Vec<(String, usize)> =
            e.inputs().map(|d| (d.name.clone(), d.numel())).collect();
        for (i, (name, n)) in inputs.iter().enumerate() {
            ctx.set_input(name, &osprey_engine::tune::pseudo_random(*n, 17 + i as u64))?;
        }
        ctx.run()?;
        ctxs.push(ctx);
    }
    let mut samples = vec![Vec::new(); ctxs.len()];
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    // Each context has its own pool, whose workers spin for a while after
    // a run: the next context would start with a core taken by them. Wait
    // until they sleep.
    let settle = osprey_kernels::knobs::pool_spin() + std::time::Duration::from_millis(1);
    for round in 0..15 {
        for (ctx, s) in ctxs.iter_mut().zip(&mut samples) {
            std::thread::sleep(settle);
            let t = Instant::now();
            ctx.run()?;
            s.push(t.elapsed().as_secs_f64() * 1e3);
        }
        if round >= 4 && Instant::now() > deadline {
            break;
        }
    }
    let median = |mut s: Vec<f64>| {
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let ratio = match &samples[..] {
        [a, b] => median(a.iter().zip(b).map(|(a, b)| b / a).collect()),
        _ => f64::NAN,
    };
    Ok((samples.into_iter().map(median).collect(), ratio))
}
