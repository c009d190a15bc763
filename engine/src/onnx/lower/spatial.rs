//! Lowering of spatial ops: convolution (and transposed), padding modes,
//! resize/upsample.

use osprey_kernels::activation::Activation;
use osprey_kernels::resize::{CoordMode, NearestMode, ResizeMode};

use super::{node, Attrs, Ins, Lowered, R};
use crate::ir::{ConvAttrs, Op};

pub(super) fn two(v: Vec<usize>, what: &str) -> R<[usize; 2]> {
    match v[..] {
        [a, b] => Ok([a, b]),
        _ => Err(format!("{what} {v:?}: only 2-D is supported")),
    }
}

/// Explicit or `auto_pad`-derived pads (top, left, bottom, right).
pub(super) fn resolve_pads(
    a: &Attrs<'_>,
    input: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dil: [usize; 2],
) -> R<[usize; 4]> {
    let auto = a.s("auto_pad").unwrap_or_else(|| "NOTSET".into());
    match auto.as_str() {
        "NOTSET" | "" => {
            let p = a.usizes("pads", "attribute")?.unwrap_or(vec![0; 4]);
            match p[..] {
                [t, l, b, r] => Ok([t, l, b, r]),
                _ => Err(format!("pads {p:?}: only 2-D is supported")),
            }
        }
        "VALID" => Ok([0; 4]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut out = [0usize; 4];
            for d in 0..2 {
                if strides[d] == 0 {
                    return Err("stride 0".into());
                }
                let o = input[d].div_ceil(strides[d]);
                let span = (kernel[d].saturating_sub(1)) * dil[d] + 1;
                let total = ((o.saturating_sub(1)) * strides[d] + span).saturating_sub(input[d]);
                let small = total / 2;
                let (b, e) = if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                out[d] = b;
                out[d + 2] = e;
            }
            Ok(out)
        }
        other => Err(format!("auto_pad '{other}' is not supported")),
    }
}

pub(super) fn lower_conv(a: &Attrs<'_>, ins: &Ins<'_>, transposed: bool) -> R<Lowered> {
    let (x, w) = (ins.t(0)?, ins.t(1)?);
    if x.shape.len() != 4 || w.shape.len() != 4 {
        return Err(format!(
            "only 2-D convolution (rank-4 input and weights) is supported, got {:?} and {:?}",
            x.shape, w.shape
        ));
    }
    if !w.is_const() {
        return Err(format!("weights '{}' must be a constant", w.name));
    }
    if let Some(b) = ins.opt(2) {
        if !b.is_const() {
            return Err(format!("bias '{}' must be a constant", b.name));
        }
    }
    let groups = a.i("group").unwrap_or(1);
    let groups = usize::try_from(groups)
        .ok()
        .filter(|&g| g > 0)
        .ok_or(format!("group {groups}"))?;
    let kernel = match a.usizes("kernel_shape", "attribute")? {
        Some(k) => two(k, "kernel_shape")?,
        None => [w.shape[2], w.shape[3]],
    };
    if kernel != [w.shape[2], w.shape[3]] {
        return Err(format!(
            "kernel_shape {kernel:?} disagrees with weights {:?}",
            w.shape
        ));
    }
    let strides = pair(a, "strides", 1)?;
    let dilations = pair(a, "dilations", 1)?;
    if strides.contains(&0) || dilations.contains(&0) {
        return Err("zero stride or dilation".into());
    }
    let (n, c_in, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    // Weights: [c_out, c_in/g, kh, kw], or [c_in, c_out/g, kh, kw] transposed.
    let (c_out, fits) = if transposed {
        (
            w.shape[1] * groups,
            w.shape[0] == c_in && c_in % groups == 0,
        )
    } else {
        (
            w.shape[0],
            w.shape[1] * groups == c_in && w.shape[0] % groups == 0,
        )
    };
    if !fits {
        return Err(format!(
            "weights {:?} with group {groups} do not fit {c_in} input channels",
            w.shape
        ));
    }
    if let Some(b) = ins.opt(2) {
        if b.numel() != c_out {
            return Err(format!(
                "bias has {} values for {c_out} output channels",
                b.numel()
            ));
        }
    }
    let output_padding = if transposed {
        pair(a, "output_padding", 0)?
    } else {
        [0, 0]
    };
    let pads = if transposed {
        transposed_pads(a, [h, wd], kernel, strides, dilations, output_padding)?
    } else {
        resolve_pads(a, [h, wd], kernel, strides, dilations)?
    };
    let attrs = ConvAttrs {
        kernel,
        strides,
        dilations,
        pads,
        groups,
        output_padding,
        activation: Activation::None,
        residual: false,
        int8_input_scale: None,
        int8_read_scale: None,
        channels_last: false,
    };
    let (oh, ow) = if transposed {
        attrs
            .transpose_geometry(&x.shape, c_out)
            .out_hw()
            .filter(|&(a, b)| a > 0 && b > 0)
            .ok_or("padding larger than the output")?
    } else {
        let geo = attrs.geometry(&x.shape, &[n, c_out]);
        match (geo.out_h(), geo.out_w()) {
            (Some(oh), Some(ow)) if oh > 0 && ow > 0 => (oh, ow),
            _ => {
                return Err(format!(
                    "kernel {kernel:?} does not fit input {:?} with pads {pads:?}",
                    x.shape
                ))
            }
        }
    };
    let op = if transposed {
        Op::ConvTranspose(attrs)
    } else {
        Op::Conv(attrs)
    };
    node(op, ins.runtime_ids(), vec![vec![n, c_out, oh, ow]])
}

/// A 2-D attribute with a default for both dimensions (strides, dilations...).
pub(super) fn pair(a: &Attrs<'_>, name: &str, default: usize) -> R<[usize; 2]> {
    two(
        a.usizes(name, "attribute")?
            .unwrap_or(vec![default, default]),
        name,
    )
}

/// Pads of a transposed convolution: from `output_shape`, from `auto_pad`
/// SAME_* (output = input × stride), or explicit.
fn transposed_pads(
    a: &Attrs<'_>,
    input: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    output_padding: [usize; 2],
) -> R<[usize; 4]> {
    let auto = a.s("auto_pad").unwrap_or_else(|| "NOTSET".into());
    // An explicit output_shape must fit the full output; SAME_* clamps at 0.
    let (target, exact): ([usize; 2], bool) = match a.usizes("output_shape", "attribute")? {
        Some(os) => (
            two(
                if os.len() == 4 { os[2..].to_vec() } else { os },
                "output_shape",
            )?,
            true,
        ),
        None if auto == "SAME_UPPER" || auto == "SAME_LOWER" => {
            ([input[0] * strides[0], input[1] * strides[1]], false)
        }
        None => return resolve_pads(a, input, kernel, strides, dilations),
    };
    let mut p = [0usize; 4];
    for d in 0..2 {
        let full =
            strides[d] * (input[d] - 1) + output_padding[d] + (kernel[d] - 1) * dilations[d] + 1;
        let total = match full.checked_sub(target[d]) {
            Some(t) => t,
            None if exact => return Err("output_shape larger than the full output".into()),
            None => 0,
        };
        let (b, e) = if auto == "SAME_UPPER" {
            (total / 2, total - total / 2)
        } else {
            (total - total / 2, total / 2)
        };
        p[d] = b;
        p[d + 2] = e;
    }
    Ok(p)
}

pub(super) fn lower_resize(a: &Attrs<'_>, ins: &Ins<'_>, op_type: &str, opset: i64) -> R<Lowered> {
    let x = ins.t(0)?;
    if x.shape.len() != 4 {
        return Err(format!(
            "only rank-4 (NCHW) resize is supported, got {:?}",
            x.shape
        ));
    }
    let mode_s = a.s("mode").unwrap_or_else(|| "nearest".into());
    let legacy = op_type == "Upsample" || opset < 11;
    let (scales, sizes) = if op_type == "Upsample" && opset < 9 {
        (a.floats("scales"), None)
    } else if legacy {
        (ins.opt_f32s(1)?, None)
    } else {
        (
            ins.opt_f32s(2)?.filter(|s| !s.is_empty()),
            ins.opt_i64s(3)?.filter(|s| !s.is_empty()),
        )
    };
    if a.i("antialias").unwrap_or(0) != 0 {
        return Err("antialiased resize is not supported".into());
    }
    if a.ints("axes").is_some() {
        return Err("Resize 'axes' is not supported".into());
    }
    let (out, sc) = match (scales, sizes) {
        (_, Some(sz)) => {
            if sz.len() != 4 || sz.iter().any(|&v| v <= 0) {
                return Err(format!("sizes {sz:?} must be 4 positive values"));
            }
            let out: Vec<usize> = sz.iter().map(|&v| v as usize).collect();
            let sc: Vec<f32> = out
                .iter()
                .zip(&x.shape)
                .map(|(&o, &i)| o as f32 / i as f32)
                .collect();
            (out, sc)
        }
        (Some(s), None) => {
            if s.len() != 4 || s.iter().any(|&v| !(v > 0.0 && v.is_finite())) {
                return Err(format!("scales {s:?} must be 4 positive values"));
            }
            let out: Vec<usize> = x
                .shape
                .iter()
                .zip(&s)
                .map(|(&i, &f)| (i as f32 * f).floor() as usize)
                .collect();
            (out, s)
        }
        (None, None) => return Err("neither scales nor sizes given".into()),
    };
    if out[0] != x.shape[0] || out[1] != x.shape[1] {
        return Err("resizing the batch or channel dimension is not supported".into());
    }
    if out[2] == 0 || out[3] == 0 {
        return Err(format!("output size {out:?} is empty"));
    }
    let coord = if legacy {
        CoordMode::Asymmetric
    } else {
        match a
            .s("coordinate_transformation_mode")
            .as_deref()
            .unwrap_or("half_pixel")
        {
            "half_pixel" => CoordMode::HalfPixel,
            "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
            "align_corners" => CoordMode::AlignCorners,
            "asymmetric" => CoordMode::Asymmetric,
            "tf_half_pixel_for_nearest" => CoordMode::TfHalfPixelForNearest,
            other => {
                return Err(format!(
                    "coordinate_transformation_mode '{other}' is not supported"
                ))
            }
        }
    };
    let mode = match mode_s.as_str() {
        "nearest" => ResizeMode::Nearest(if legacy {
            NearestMode::Floor
        } else {
            match a
                .s("nearest_mode")
                .as_deref()
                .unwrap_or("round_prefer_floor")
            {
                "round_prefer_floor" => NearestMode::RoundPreferFloor,
                "round_prefer_ceil" => NearestMode::RoundPreferCeil,
                "floor" => NearestMode::Floor,
                "ceil" => NearestMode::Ceil,
                other => return Err(format!("nearest_mode '{other}' is not supported")),
            }
        }),
        "linear" | "bilinear" => ResizeMode::Linear,
        other => return Err(format!("resize mode '{other}' is not supported")),
    };
    node(
        Op::Resize {
            mode,
            coord,
            scales: [sc[2], sc[3]],
            channels_last: false,
        },
        vec![ins.id(0)?],
        vec![out],
    )
}
