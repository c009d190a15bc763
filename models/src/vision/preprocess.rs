//! Frame → model input tensor in one pass: colour conversion, resize,
//! normalisation and layout, written straight into the engine's input.
//!
//! The [`Preprocessor`] keeps its tap tables and scratch rows between
//! frames; it allocates only when the source frame size changes, so a
//! camera stream at a fixed resolution runs allocation-free after the
//! first frame.

use serde::Deserialize;

use osprey_kernels::color;

use super::frame::{Frame, RowScratch};
use super::resize::{Filter, LinearTaps, PillowTaps, PILLOW_BITS};
use super::VisionError;

/// Bytes after each converted plane row, repeating its last pixel, so the
/// gather kernels may read a whole 4-byte word at any tap.
const PLANE_PAD: usize = 4;

/// How the frame is fitted into the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Scale each axis independently to fill the input (aspect not kept).
    #[default]
    Stretch,
    /// Keep the aspect ratio, centre, and pad the rest with `pad_value`
    /// (Ultralytics-style).
    Letterbox,
}

/// Channel order the model expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChannelOrder {
    /// Red, green, blue.
    #[default]
    Rgb,
    /// Blue, green, red (OpenCV/Paddle models).
    Bgr,
}

/// Tensor layout of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[1, 3, H, W]`.
    #[default]
    Nchw,
    /// `[1, H, W, 3]`.
    Nhwc,
}

/// Everything that defines a model's input preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessSpec {
    /// Input width in pixels.
    pub width: usize,
    /// Input height in pixels.
    pub height: usize,
    /// Input tensor layout.
    pub layout: Layout,
    /// Stretch or letterbox.
    pub resize: ResizeMode,
    /// Interpolation filter.
    pub filter: Filter,
    /// Channel order of the model.
    pub channel_order: ChannelOrder,
    /// `x = (pixel · scale − mean[c]) / std[c]`, per model channel.
    pub scale: f32,
    /// Per-channel mean (model channel order).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (model channel order).
    pub std: [f32; 3],
    /// Pixel value (0..255, before normalisation) of letterbox padding.
    pub pad_value: f32,
}

/// Maps model-input pixel coordinates back to the source frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageTransform {
    /// Source width in pixels.
    pub src_width: usize,
    /// Source height in pixels.
    pub src_height: usize,
    /// Source pixels per input pixel, x.
    pub scale_x: f64,
    /// Source pixels per input pixel, y.
    pub scale_y: f64,
    /// Left padding in input pixels (letterbox).
    pub pad_x: f64,
    /// Top padding in input pixels (letterbox).
    pub pad_y: f64,
}

impl ImageTransform {
    /// Input-pixel point → source-pixel point: `(x − pad_x) · scale_x`.
    pub fn to_source(&self, x: f32, y: f32) -> (f32, f32) {
        (
            ((x as f64 - self.pad_x) * self.scale_x) as f32,
            ((y as f64 - self.pad_y) * self.scale_y) as f32,
        )
    }
}

#[derive(Debug, Clone)]
enum Taps {
    Linear(LinearTaps, LinearTaps),
    Pillow(PillowTaps, PillowTaps),
}

#[derive(Debug, Clone)]
struct Geometry {
    src: (usize, usize),
    new_w: usize,
    new_h: usize,
    pad_x: usize,
    pad_y: usize,
    taps: Taps,
}

/// Reusable preprocessing state for one model input.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: PreprocessSpec,
    /// Per model channel: `x = v·a + b` and which RGB channel it reads.
    a: [f32; 3],
    b: [f32; 3],
    src_channel: [usize; 3],
    geometry: Option<Geometry>,
    /// One source row as planar R, G, B (`3 × src width`), and chroma scratch.
    planes: Vec<u8>,
    scratch: RowScratch,
    /// Pillow vertical accumulators (`new width`).
    acc: Vec<i32>,
    hrows: [Vec<f32>; 2],
    tags: [usize; 2],
    inter: Vec<u8>,
}

impl Preprocessor {
    /// A preprocessor for `spec`.
    pub fn new(spec: PreprocessSpec) -> Result<Preprocessor, VisionError> {
        if spec.width == 0 || spec.height == 0 || spec.width > 16384 || spec.height > 16384 {
            return Err(VisionError::Spec(format!(
                "input size {}x{} is out of range",
                spec.width, spec.height
            )));
        }
        let mut a = [0.0; 3];
        let mut b = [0.0; 3];
        for c in 0..3 {
            let s = spec.std[c];
            if !(s.is_finite() && s != 0.0 && spec.mean[c].is_finite() && spec.scale.is_finite()) {
                return Err(VisionError::Spec(format!(
                    "normalisation of channel {c}: mean {} std {} scale {} (std must be finite and non-zero)",
                    spec.mean[c], s, spec.scale
                )));
            }
            a[c] = spec.scale / s;
            b[c] = -spec.mean[c] / s;
        }
        let src_channel = match spec.channel_order {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        Ok(Preprocessor {
            spec,
            a,
            b,
            src_channel,
            geometry: None,
            planes: Vec::new(),
            scratch: RowScratch::default(),
            acc: Vec::new(),
            hrows: [Vec::new(), Vec::new()],
            tags: [usize::MAX; 2],
            inter: Vec::new(),
        })
    }

    /// The spec this preprocessor implements.
    pub fn spec(&self) -> &PreprocessSpec {
        &self.spec
    }

    /// Elements of the input tensor (`3 × width × height`).
    pub fn tensor_len(&self) -> usize {
        3 * self.spec.width * self.spec.height
    }

    /// The transform a frame of `w × h` would get (no pixels touched).
    pub fn transform_for(&self, w: usize, h: usize) -> ImageTransform {
        let (new_w, new_h, pad_x, pad_y) = self.fit(w, h);
        ImageTransform {
            src_width: w,
            src_height: h,
            scale_x: w as f64 / new_w as f64,
            scale_y: h as f64 / new_h as f64,
            pad_x: pad_x as f64,
            pad_y: pad_y as f64,
        }
    }

    fn fit(&self, w: usize, h: usize) -> (usize, usize, usize, usize) {
        let (ow, oh) = (self.spec.width, self.spec.height);
        match self.spec.resize {
            ResizeMode::Stretch => (ow, oh, 0, 0),
            ResizeMode::Letterbox => {
                let r = (ow as f64 / w as f64).min(oh as f64 / h as f64);
                let nw = ((w as f64 * r).round() as usize).clamp(1, ow);
                let nh = ((h as f64 * r).round() as usize).clamp(1, oh);
                (nw, nh, (ow - nw) / 2, (oh - nh) / 2)
            }
        }
    }

    fn ensure_geometry(&mut self, w: usize, h: usize) {
        if matches!(&self.geometry, Some(g) if g.src == (w, h)) {
            return;
        }
        let (new_w, new_h, pad_x, pad_y) = self.fit(w, h);
        let taps = match self.spec.filter {
            Filter::PillowBilinear => {
                Taps::Pillow(PillowTaps::new(w, new_w), PillowTaps::new(h, new_h))
            }
            f => Taps::Linear(LinearTaps::new(f, w, new_w), LinearTaps::new(f, h, new_h)),
        };
        self.planes = vec![0; 3 * (w + PLANE_PAD)];
        self.scratch = RowScratch::new(w);
        self.acc = vec![0; new_w];
        self.hrows = [vec![0.0; 3 * new_w], vec![0.0; 3 * new_w]];
        self.tags = [usize::MAX; 2];
        self.inter = match &taps {
            Taps::Pillow(_, v) => {
                let rows = pillow_rows(v, h);
                vec![0; 3 * rows.len() * new_w]
            }
            Taps::Linear(..) => Vec::new(),
        };
        self.geometry = Some(Geometry {
            src: (w, h),
            new_w,
            new_h,
            pad_x,
            pad_y,
            taps,
        });
    }

    /// Converts, resizes and normalises `frame` into `out` (the model's
    /// input tensor, `3 × width × height` floats in the spec's layout).
    pub fn run(&mut self, frame: &Frame, out: &mut [f32]) -> Result<ImageTransform, VisionError> {
        if out.len() != self.tensor_len() {
            return Err(VisionError::Spec(format!(
                "input tensor has {} elements, the preprocessing writes {} (3x{}x{})",
                out.len(),
                self.tensor_len(),
                self.spec.height,
                self.spec.width
            )));
        }
        let (w, h) = (frame.width(), frame.height());
        self.ensure_geometry(w, h);
        self.tags = [usize::MAX; 2];
        let Some(g) = self.geometry.take() else {
            return Err(VisionError::Spec("geometry missing".into()));
        };
        if self.spec.resize == ResizeMode::Letterbox {
            self.fill_padding(&g, out);
        }
        match &g.taps {
            Taps::Linear(ht, vt) => self.run_linear(frame, &g, ht, vt, out),
            Taps::Pillow(ht, vt) => self.run_pillow(frame, &g, ht, vt, out),
        }
        self.geometry = Some(g);
        Ok(self.transform_for(w, h))
    }

    fn fill_padding(&self, g: &Geometry, out: &mut [f32]) {
        let (ow, oh) = (self.spec.width, self.spec.height);
        let inside = |x: usize, y: usize| {
            x >= g.pad_x && x < g.pad_x + g.new_w && y >= g.pad_y && y < g.pad_y + g.new_h
        };
        let pad: [f32; 3] = std::array::from_fn(|c| self.spec.pad_value * self.a[c] + self.b[c]);
        for y in 0..oh {
            let row_inside = y >= g.pad_y && y < g.pad_y + g.new_h;
            for x in 0..ow {
                if row_inside && inside(x, y) {
                    continue;
                }
                for c in 0..3 {
                    match self.spec.layout {
                        Layout::Nchw => out[(c * oh + y) * ow + x] = pad[c],
                        Layout::Nhwc => out[(y * ow + x) * 3 + c] = pad[c],
                    }
                }
            }
        }
    }

    /// Source row `r` as planar R, G, B in `self.planes`.
    fn load_planes(&mut self, frame: &Frame, r: usize) {
        let w = frame.width();
        let (rp, rest) = self.planes.split_at_mut(w + PLANE_PAD);
        let (gp, bp) = rest.split_at_mut(w + PLANE_PAD);
        frame.row_to_planar(
            r,
            [&mut rp[..w], &mut gp[..w], &mut bp[..w]],
            &mut self.scratch,
        );
    }

    /// Horizontally interpolated source row `r` into slot `slot` (planar
    /// R, G, B planes of `new_w`).
    fn load_hrow(&mut self, frame: &Frame, ht: &LinearTaps, r: usize, slot: usize) {
        let new_w = ht.i0.len();
        let dst = &mut self.hrows[slot];
        let (rp, rest) = dst.split_at_mut(new_w);
        let (gp, bp) = rest.split_at_mut(new_w);
        let taps = ht.i0.iter().zip(&ht.i1).zip(&ht.f);
        let lerp = |a: u8, b: u8, f: f32| a as f32 + (b as f32 - a as f32) * f;
        if let Some(row) = frame.rgb_row(r) {
            // Decoded images: gather straight from the interleaved row. The
            // second tap is the next pixel or (with weight 0, or at the
            // clamped edge) the same one, so one 6-byte window serves both.
            for (((&i0, &i1), &f), ((ro, go), bo)) in
                taps.zip(rp.iter_mut().zip(gp.iter_mut()).zip(bp.iter_mut()))
            {
                let a = 3 * i0 as usize;
                let (p, q) = match row.get(a..a + 6) {
                    Some(win) if i1 == i0 + 1 => (&win[..3], &win[3..]),
                    _ => (&row[a..a + 3], &row[3 * i1 as usize..3 * i1 as usize + 3]),
                };
                *ro = lerp(p[0], q[0], f);
                *go = lerp(p[1], q[1], f);
                *bo = lerp(p[2], q[2], f);
            }
        } else {
            // Other formats: convert the row to planes (vectorised), each
            // padded with copies of its last pixel, then gather pairs: the
            // second tap is i0 + 1, or i0 itself where the padding repeats it.
            let w = frame.width();
            let stride = w + PLANE_PAD;
            let (rp_src, rest) = self.planes.split_at_mut(stride);
            let (gp_src, bp_src) = rest.split_at_mut(stride);
            frame.row_to_planar(
                r,
                [&mut rp_src[..w], &mut gp_src[..w], &mut bp_src[..w]],
                &mut self.scratch,
            );
            for plane in [&mut *rp_src, &mut *gp_src, &mut *bp_src] {
                let last = plane[w - 1];
                plane[w..].fill(last);
            }
            color::lerp_gather_u8(rp_src, &ht.i0, &ht.f, rp);
            color::lerp_gather_u8(gp_src, &ht.i0, &ht.f, gp);
            color::lerp_gather_u8(bp_src, &ht.i0, &ht.f, bp);
        }
        self.tags[slot] = r;
    }

    fn slot_for(&mut self, frame: &Frame, ht: &LinearTaps, r: usize, keep: Option<usize>) -> usize {
        if let Some(s) = self.tags.iter().position(|&t| t == r) {
            return s;
        }
        let slot = match keep {
            Some(k) => 1 - k,
            // Rows only move down: the smaller tag is the older one.
            None if self.tags[0] == usize::MAX => 0,
            None if self.tags[1] == usize::MAX => 1,
            None => usize::from(self.tags[1] < self.tags[0]),
        };
        self.load_hrow(frame, ht, r, slot);
        slot
    }

    fn run_linear(
        &mut self,
        frame: &Frame,
        g: &Geometry,
        ht: &LinearTaps,
        vt: &LinearTaps,
        out: &mut [f32],
    ) {
        let (ow, oh) = (self.spec.width, self.spec.height);
        let nw = g.new_w;
        for y in 0..g.new_h {
            let (r0, r1, fy) = (vt.i0[y] as usize, vt.i1[y] as usize, vt.f[y]);
            let s0 = self.slot_for(frame, ht, r0, None);
            let s1 = self.slot_for(frame, ht, r1, Some(s0));
            let (top, bot) = (&self.hrows[s0], &self.hrows[s1]);
            let oy = g.pad_y + y;
            for c in 0..3 {
                let sc = self.src_channel[c];
                let t = &top[sc * nw..(sc + 1) * nw];
                let bt = &bot[sc * nw..(sc + 1) * nw];
                let (a, b) = (self.a[c], self.b[c]);
                match self.spec.layout {
                    Layout::Nchw => {
                        let start = (c * oh + oy) * ow + g.pad_x;
                        let dst = &mut out[start..start + nw];
                        for x in 0..nw {
                            let v = t[x] + (bt[x] - t[x]) * fy;
                            dst[x] = v * a + b;
                        }
                    }
                    Layout::Nhwc => {
                        let start = (oy * ow + g.pad_x) * 3;
                        let dst = &mut out[start..start + 3 * nw];
                        for x in 0..nw {
                            let v = t[x] + (bt[x] - t[x]) * fy;
                            dst[3 * x + c] = v * a + b;
                        }
                    }
                }
            }
        }
    }

    fn run_pillow(
        &mut self,
        frame: &Frame,
        g: &Geometry,
        ht: &PillowTaps,
        vt: &PillowTaps,
        out: &mut [f32],
    ) {
        let (w, h) = g.src;
        let (ow, oh) = (self.spec.width, self.spec.height);
        let nw = g.new_w;
        let rows = pillow_rows(vt, h);
        let n_rows = rows.len();
        let first = rows.start;
        // Horizontal pass (a copy when the width does not change) into the
        // planar u8 intermediate: inter[(c · n_rows + i) · nw + x].
        for (i, r) in rows.enumerate() {
            self.load_planes(frame, r);
            for c in 0..3 {
                let src = &self.planes[c * (w + PLANE_PAD)..c * (w + PLANE_PAD) + w];
                let dst = &mut self.inter[(c * n_rows + i) * nw..(c * n_rows + i + 1) * nw];
                if nw == w {
                    dst.copy_from_slice(src);
                    continue;
                }
                for (x, d) in dst.iter_mut().enumerate() {
                    let s0 = ht.start[x] as usize;
                    let n = ht.len[x] as usize;
                    let k = &ht.k[x * ht.width..x * ht.width + n];
                    let mut acc: i32 = 1 << (PILLOW_BITS - 1);
                    for (kj, p) in k.iter().zip(&src[s0..s0 + n]) {
                        acc += kj * *p as i32;
                    }
                    *d = (acc >> PILLOW_BITS).clamp(0, 255) as u8;
                }
            }
        }
        // Vertical pass (skipped when the height does not change), a whole
        // output row at a time, then normalise into the tensor.
        for y in 0..g.new_h {
            let oy = g.pad_y + y;
            for c in 0..3 {
                let sc = self.src_channel[c];
                let plane = &self.inter[sc * n_rows * nw..(sc + 1) * n_rows * nw];
                let acc = &mut self.acc[..nw];
                if g.new_h == h {
                    let row = &plane[(y - first) * nw..(y - first + 1) * nw];
                    for (a, p) in acc.iter_mut().zip(row) {
                        *a = *p as i32;
                    }
                } else {
                    acc.fill(1 << (PILLOW_BITS - 1));
                    let s0 = vt.start[y] as usize;
                    let n = vt.len[y] as usize;
                    for (t, &kt) in vt.k[y * vt.width..y * vt.width + n].iter().enumerate() {
                        let row = &plane[(s0 + t - first) * nw..(s0 + t - first + 1) * nw];
                        for (a, p) in acc.iter_mut().zip(row) {
                            *a += kt * *p as i32;
                        }
                    }
                    for a in acc.iter_mut() {
                        *a = (*a >> PILLOW_BITS).clamp(0, 255);
                    }
                }
                let (ca, cb) = (self.a[c], self.b[c]);
                match self.spec.layout {
                    Layout::Nchw => {
                        let start = (c * oh + oy) * ow + g.pad_x;
                        for (o, a) in out[start..start + nw].iter_mut().zip(acc.iter()) {
                            *o = *a as f32 * ca + cb;
                        }
                    }
                    Layout::Nhwc => {
                        let start = (oy * ow + g.pad_x) * 3;
                        for (x, a) in acc.iter().enumerate() {
                            out[start + 3 * x + c] = *a as f32 * ca + cb;
                        }
                    }
                }
            }
        }
    }
}

/// Source rows the vertical Pillow pass reads.
fn pillow_rows(vt: &PillowTaps, h: usize) -> std::ops::Range<usize> {
    let n = vt.start.len();
    if n == 0 {
        return 0..0;
    }
    let first = vt.start[0] as usize;
    let last = (0..n)
        .map(|i| vt.start[i] as usize + vt.len[i] as usize)
        .max()
        .unwrap_or(first)
        .min(h);
    first..last.max(first)
}

/// Rounds `v` the way the rest of the module quantises pixels (for tests).
#[cfg(test)]
pub(crate) mod reference {
    use super::*;

    /// Straightforward preprocessing: decode the whole frame to RGB with
    /// [`Frame::pixel_rgb`], then resize each output pixel from the
    /// formulas of PREPROCESS.md, then normalise.
    pub fn preprocess(spec: &PreprocessSpec, frame: &Frame) -> Vec<f32> {
        let (w, h) = (frame.width(), frame.height());
        let mut rgb = vec![[0u8; 3]; w * h];
        for y in 0..h {
            for x in 0..w {
                rgb[y * w + x] = frame.pixel_rgb(x, y);
            }
        }
        let p = Preprocessor::new(spec.clone()).unwrap();
        let (nw, nh, px, py) = p.fit(w, h);
        let (ow, oh) = (spec.width, spec.height);
        let perm = p.src_channel;
        let norm = |c: usize, v: f32| (v * spec.scale - spec.mean[c]) / spec.std[c];
        let mut out = vec![0.0f32; 3 * ow * oh];
        let put = |out: &mut Vec<f32>, c: usize, y: usize, x: usize, v: f32| match spec.layout {
            Layout::Nchw => out[(c * oh + y) * ow + x] = v,
            Layout::Nhwc => out[(y * ow + x) * 3 + c] = v,
        };
        for y in 0..oh {
            for x in 0..ow {
                for c in 0..3 {
                    put(&mut out, c, y, x, norm(c, spec.pad_value));
                }
            }
        }
        match spec.filter {
            Filter::PillowBilinear => {
                let ht = PillowTaps::new(w, nw);
                let vt = PillowTaps::new(h, nh);
                let mut tmp = vec![[0u8; 3]; nw * h];
                for y in 0..h {
                    for x in 0..nw {
                        for c in 0..3 {
                            tmp[y * nw + x][c] = if nw == w {
                                rgb[y * w + x][c]
                            } else {
                                ht.apply(x, |j| rgb[y * w + j][c])
                            };
                        }
                    }
                }
                for y in 0..nh {
                    for x in 0..nw {
                        for c in 0..3 {
                            let v = if nh == h {
                                tmp[y * nw + x][perm[c]]
                            } else {
                                vt.apply(y, |r| tmp[r * nw + x][perm[c]])
                            };
                            put(&mut out, c, py + y, px + x, norm(c, v as f32));
                        }
                    }
                }
            }
            f => {
                let ht = LinearTaps::new(f, w, nw);
                let vt = LinearTaps::new(f, h, nh);
                for y in 0..nh {
                    let (y0, y1, fy) = (vt.i0[y] as usize, vt.i1[y] as usize, vt.f[y]);
                    for x in 0..nw {
                        let (x0, x1, fx) = (ht.i0[x] as usize, ht.i1[x] as usize, ht.f[x]);
                        for c in 0..3 {
                            let s = perm[c];
                            let tl = rgb[y0 * w + x0][s] as f32;
                            let tr = rgb[y0 * w + x1][s] as f32;
                            let bl = rgb[y1 * w + x0][s] as f32;
                            let br = rgb[y1 * w + x1][s] as f32;
                            let top = tl + (tr - tl) * fx;
                            let bot = bl + (br - bl) * fx;
                            put(&mut out, c, py + y, px + x, norm(c, top + (bot - top) * fy));
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::frame::PixelFormat;
    use proptest::prelude::*;

    fn spec(
        filter: Filter,
        resize: ResizeMode,
        layout: Layout,
        order: ChannelOrder,
        w: usize,
        h: usize,
    ) -> PreprocessSpec {
        PreprocessSpec {
            width: w,
            height: h,
            layout,
            resize,
            filter,
            channel_order: order,
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            pad_value: 114.0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn matches_reference_for_every_format_and_filter(
            f in 0usize..7, w in 1usize..40, h in 1usize..30, pad in 0usize..3,
            filt in 0usize..4, letterbox in any::<bool>(), nhwc in any::<bool>(), bgr in any::<bool>(),
            ow in 1usize..24, oh in 1usize..24, seed in any::<u64>(),
        ) {
            let format = PixelFormat::ALL[f];
            let stride = format.min_stride(w).unwrap() + pad;
            let len = format.required_len(w, h, stride).unwrap();
            let data = osprey_engine::tune::pseudo_random(len, seed)
                .into_iter()
                .map(|v| ((v + 1.0) * 127.9) as u8)
                .collect::<Vec<u8>>();
            let frame = Frame::new(&data, format, w, h, stride).unwrap();
            let filter = [Filter::PillowBilinear, Filter::TfLegacyBilinear, Filter::Bilinear, Filter::Nearest][filt];
            let s = spec(
                filter,
                if letterbox { ResizeMode::Letterbox } else { ResizeMode::Stretch },
                if nhwc { Layout::Nhwc } else { Layout::Nchw },
                if bgr { ChannelOrder::Bgr } else { ChannelOrder::Rgb },
                ow, oh,
            );
            let want = reference::preprocess(&s, &frame);
            let mut p = Preprocessor::new(s).unwrap();
            let mut got = vec![f32::NAN; p.tensor_len()];
            // Twice: the second run reuses the cached geometry and rows.
            for _ in 0..2 {
                p.run(&frame, &mut got).unwrap();
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    prop_assert!((g - r).abs() <= 1e-5, "elem {i}: got {g} want {r}");
                }
            }
        }
    }

    #[test]
    fn letterbox_transform_maps_back() {
        let s = spec(
            Filter::Bilinear,
            ResizeMode::Letterbox,
            Layout::Nchw,
            ChannelOrder::Rgb,
            640,
            640,
        );
        let p = Preprocessor::new(s).unwrap();
        let t = p.transform_for(1920, 1080);
        assert_eq!((t.pad_x, t.pad_y), (0.0, 140.0));
        let (x, y) = t.to_source(320.0, 320.0);
        assert!((x - 960.0).abs() < 1e-3 && (y - 540.0).abs() < 1e-3);
    }

    #[test]
    fn wrong_tensor_size_and_bad_spec_are_errors() {
        let mut s = spec(
            Filter::Nearest,
            ResizeMode::Stretch,
            Layout::Nchw,
            ChannelOrder::Rgb,
            4,
            4,
        );
        let mut p = Preprocessor::new(s.clone()).unwrap();
        let px = [0u8; 3];
        let f = Frame::packed(&px, PixelFormat::Rgb8, 1, 1).unwrap();
        assert!(p.run(&f, &mut [0.0; 47]).is_err());
        assert!(p.run(&f, &mut [0.0; 48]).is_ok());
        s.std[1] = 0.0;
        assert!(Preprocessor::new(s).is_err());
    }
}
