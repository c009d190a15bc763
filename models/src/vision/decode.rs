//! Output decoders: CenterNet, YOLOv5, YOLOv8, NMS and classifier top-k.
//!
//! Every decoder keeps its candidate buffers between frames; after the
//! first frame (warm-up) decoding allocates nothing.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::preprocess::ImageTransform;
use super::VisionError;

/// One detected object, in source-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// Class index (line of the labels file).
    pub class_id: u32,
    /// Confidence.
    pub score: f32,
    /// Left edge.
    pub x1: f32,
    /// Top edge.
    pub y1: f32,
    /// Right edge.
    pub x2: f32,
    /// Bottom edge.
    pub y2: f32,
}

impl Detection {
    /// `[x1, y1, x2, y2]`.
    pub fn bbox(&self) -> [f32; 4] {
        [self.x1, self.y1, self.x2, self.y2]
    }
}

/// Intersection over union in double precision; corners are normalised
/// with min/max first (flipped boxes are fine) and a box of area ≤ 0 has
/// IoU 0 with everything (TF's `nonMaxSuppression` rule).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let n = |v: &[f32; 4]| {
        let (x1, x2) = (v[0].min(v[2]) as f64, v[0].max(v[2]) as f64);
        let (y1, y2) = (v[1].min(v[3]) as f64, v[1].max(v[3]) as f64);
        (x1, y1, x2, y2)
    };
    let (ax1, ay1, ax2, ay2) = n(a);
    let (bx1, by1, bx2, by2) = n(b);
    let area_a = (ax2 - ax1) * (ay2 - ay1);
    let area_b = (bx2 - bx1) * (by2 - by1);
    if area_a <= 0.0 || area_b <= 0.0 {
        return 0.0;
    }
    let iw = (ax2.min(bx2) - ax1.max(bx1)).max(0.0);
    let ih = (ay2.min(by2) - ay1.max(by1)).max(0.0);
    let inter = iw * ih;
    inter / (area_a + area_b - inter)
}

/// When NMS drops a box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppress {
    /// IoU ≥ threshold (TF/tf.js `nonMaxSuppression`).
    AtOrAbove,
    /// IoU > threshold (torchvision `nms`, Ultralytics).
    Above,
}

/// NMS settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NmsParams {
    /// IoU threshold.
    pub iou: f32,
    /// Boxes kept at most.
    pub max_detections: usize,
    /// One class may suppress another.
    pub class_agnostic: bool,
    /// Comparison rule.
    pub rule: Suppress,
}

/// A candidate: detection + its position in the pre-NMS order (ties in
/// score go to the lower position first).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    det: Detection,
    order: u32,
}

fn by_score_then_order(a: &Candidate, b: &Candidate) -> Ordering {
    b.det
        .score
        .total_cmp(&a.det.score)
        .then(a.order.cmp(&b.order))
}

/// Greedy NMS over `cands` (sorted here, descending score), appending the
/// kept boxes to `out`. Allocates nothing.
fn nms(cands: &mut [Candidate], p: &NmsParams, out: &mut Vec<Detection>) {
    cands.sort_unstable_by(by_score_then_order);
    let start = out.len();
    for c in cands.iter() {
        if out.len() - start >= p.max_detections {
            break;
        }
        let b = c.det.bbox();
        let suppressed = out[start..].iter().any(|k| {
            if !p.class_agnostic && k.class_id != c.det.class_id {
                return false;
            }
            let v = iou(&k.bbox(), &b);
            match p.rule {
                Suppress::AtOrAbove => v >= p.iou as f64,
                Suppress::Above => v > p.iou as f64,
            }
        });
        if !suppressed {
            out.push(c.det);
        }
    }
}

/// Heap entry ordered so the heap's top is the *worst* kept peak.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Peak {
    score: f32,
    idx: u32,
}
impl Eq for Peak {}
impl Ord for Peak {
    fn cmp(&self, o: &Self) -> Ordering {
        // "Greater" = worse: lower score, then higher index.
        o.score.total_cmp(&self.score).then(self.idx.cmp(&o.idx))
    }
}
impl PartialOrd for Peak {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// CenterNet decode as specified in CENTERNET.md: 3×3 peak NMS on the
/// heatmap, top-k in NHWC order, ltrb distances around `(stride·x,
/// stride·y)`, then greedy IoU NMS and mapping to source pixels.
#[derive(Debug)]
pub struct CenterNet {
    /// Output stride (input pixels per heatmap cell).
    pub stride: usize,
    /// Peaks kept before NMS.
    pub top_k: usize,
    /// Peaks must score strictly above this.
    pub score_threshold: f32,
    /// Box NMS.
    pub nms: NmsParams,
    heap: BinaryHeap<Peak>,
    cands: Vec<Candidate>,
}

impl CenterNet {
    /// A decoder; buffers are sized for `top_k` now.
    pub fn new(stride: usize, top_k: usize, score_threshold: f32, nms: NmsParams) -> CenterNet {
        CenterNet {
            stride,
            top_k,
            score_threshold,
            nms,
            heap: BinaryHeap::with_capacity(top_k + 1),
            cands: Vec::with_capacity(top_k),
        }
    }

    /// Decodes `heat` `[1, C, H, W]` and `wh` `[1, 4, H, W]` into `out`
    /// (cleared first), in source pixels via `t`.
    pub fn decode(
        &mut self,
        heat: &[f32],
        heat_shape: &[usize],
        wh: &[f32],
        wh_shape: &[usize],
        t: &ImageTransform,
        out: &mut Vec<Detection>,
    ) -> Result<(), VisionError> {
        out.clear();
        let err = |detail: String| VisionError::Output {
            decoder: "centernet",
            detail,
        };
        let [1, c, h, w] = heat_shape else {
            return Err(err(format!(
                "heatmap shape {heat_shape:?}, expected [1, C, H, W]"
            )));
        };
        let (c, h, w) = (*c, *h, *w);
        if wh_shape != [1, 4, h, w] {
            return Err(err(format!(
                "box output shape {wh_shape:?}, expected [1, 4, {h}, {w}]"
            )));
        }
        if heat.len() != c * h * w || wh.len() != 4 * h * w || c * h * w > u32::MAX as usize {
            return Err(err("tensor sizes do not match their shapes".into()));
        }
        self.heap.clear();
        let thr = self.score_threshold;
        for ch in 0..c {
            let plane = &heat[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let row = &plane[y * w..(y + 1) * w];
                // Nearly every row of a sigmoid heatmap is below the
                // threshold: a branch-free count (vectorised) skips it.
                if row.iter().map(|&v| (v > thr) as u32).sum::<u32>() == 0 {
                    continue;
                }
                for x in 0..w {
                    let v = row[x];
                    // NaN fails this test too.
                    if v.partial_cmp(&thr) != Some(Ordering::Greater) {
                        continue;
                    }
                    if !is_peak(plane, w, h, x, y, v) {
                        continue;
                    }
                    let p = Peak {
                        score: v,
                        idx: ((y * w + x) * c + ch) as u32,
                    };
                    if self.heap.len() < self.top_k {
                        self.heap.push(p);
                    } else if let Some(worst) = self.heap.peek() {
                        if p < *worst {
                            self.heap.pop();
                            self.heap.push(p);
                        }
                    }
                }
            }
        }
        self.cands.clear();
        let s = self.stride as f32;
        for p in self.heap.iter() {
            let idx = p.idx as usize;
            let ch = idx % c;
            let x = (idx / c) % w;
            let y = (idx / c) / w;
            let at = |k: usize| wh[k * h * w + y * w + x];
            let (ax, ay) = (s * x as f32, s * y as f32);
            self.cands.push(Candidate {
                det: Detection {
                    class_id: ch as u32,
                    score: p.score,
                    x1: ax - at(0),
                    y1: ay - at(1),
                    x2: ax + at(2),
                    y2: ay + at(3),
                },
                order: p.idx,
            });
        }
        nms(&mut self.cands, &self.nms, out);
        for d in out.iter_mut() {
            map_box(d, t, false);
        }
        Ok(())
    }
}

/// `v` equals the maximum of its 3×3 neighbourhood (cells outside ignored).
#[inline]
fn is_peak(plane: &[f32], w: usize, h: usize, x: usize, y: usize, v: f32) -> bool {
    let (x0, x1) = (x.saturating_sub(1), (x + 1).min(w - 1));
    let (y0, y1) = (y.saturating_sub(1), (y + 1).min(h - 1));
    for yy in y0..=y1 {
        for &n in &plane[yy * w + x0..=yy * w + x1] {
            if n > v {
                return false;
            }
        }
    }
    true
}

fn map_box(d: &mut Detection, t: &ImageTransform, clip: bool) {
    let (x1, y1) = t.to_source(d.x1, d.y1);
    let (x2, y2) = t.to_source(d.x2, d.y2);
    *d = Detection {
        x1,
        y1,
        x2,
        y2,
        ..*d
    };
    if clip {
        let (w, h) = (t.src_width as f32, t.src_height as f32);
        d.x1 = d.x1.clamp(0.0, w);
        d.x2 = d.x2.clamp(0.0, w);
        d.y1 = d.y1.clamp(0.0, h);
        d.y2 = d.y2.clamp(0.0, h);
    }
}

/// Which Ultralytics head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloVersion {
    /// `[1, N, 5 + C]`: cx, cy, w, h, objectness, class scores.
    V5,
    /// `[1, 4 + C, N]` (or transposed `[1, N, 4 + C]`): cx, cy, w, h, class scores.
    V8,
}

/// YOLOv5 / YOLOv8 decode: confidence filter, best class, class-aware
/// greedy NMS (IoU > threshold), boxes mapped back through the letterbox
/// and clipped to the image (as Ultralytics' `scale_boxes` does).
#[derive(Debug)]
pub struct Yolo {
    /// Head layout.
    pub version: YoloVersion,
    /// Minimum confidence (strictly greater).
    pub score_threshold: f32,
    /// Candidates kept before NMS (highest confidence first).
    pub top_k: usize,
    /// NMS.
    pub nms: NmsParams,
    cands: Vec<Candidate>,
}

impl Yolo {
    /// A decoder.
    pub fn new(version: YoloVersion, score_threshold: f32, top_k: usize, nms: NmsParams) -> Yolo {
        Yolo {
            version,
            score_threshold,
            top_k,
            nms,
            cands: Vec::new(),
        }
    }

    /// Decodes the head output `y` of shape `shape` into `out` (cleared).
    /// `classes` is the number of labels when known (0: infer from shape).
    pub fn decode(
        &mut self,
        y: &[f32],
        shape: &[usize],
        classes: usize,
        t: &ImageTransform,
        out: &mut Vec<Detection>,
    ) -> Result<(), VisionError> {
        out.clear();
        let name = match self.version {
            YoloVersion::V5 => "yolov5",
            YoloVersion::V8 => "yolov8",
        };
        let err = |detail: String| VisionError::Output {
            decoder: name,
            detail,
        };
        let dims: &[usize] = match shape {
            [1, a, b] => &[*a, *b],
            [a, b] => &[*a, *b],
            _ => return Err(err(format!("output shape {shape:?}, expected [1, A, B]"))),
        };
        let (a, b) = (dims[0], dims[1]);
        if y.len() != a * b {
            return Err(err("tensor size does not match its shape".into()));
        }
        let extra = match self.version {
            YoloVersion::V5 => 5,
            YoloVersion::V8 => 4,
        };
        // Row-major [N, extra + C] or channel-major [extra + C, N].
        let channel_major = match self.version {
            YoloVersion::V5 => false,
            YoloVersion::V8 => {
                if classes > 0 {
                    a == extra + classes
                } else {
                    a < b
                }
            }
        };
        let (n, stride_attr, stride_box) = if channel_major { (b, b, 1) } else { (a, 1, b) };
        let attrs = if channel_major { a } else { b };
        if attrs <= extra {
            return Err(err(format!(
                "output shape {shape:?} has {attrs} values per box, need more than {extra}"
            )));
        }
        let nc = attrs - extra;
        if classes > 0 && nc != classes {
            return Err(err(format!(
                "output shape {shape:?} has {nc} classes, the labels file has {classes}"
            )));
        }
        self.cands.clear();
        let at = |i: usize, k: usize| y[i * stride_box + k * stride_attr];
        let thr = self.score_threshold;
        for i in 0..n {
            let obj = if self.version == YoloVersion::V5 {
                let o = at(i, 4);
                if o.partial_cmp(&thr) != Some(Ordering::Greater) {
                    continue;
                }
                o
            } else {
                1.0
            };
            let (mut best, mut best_c) = (f32::NEG_INFINITY, 0usize);
            for k in 0..nc {
                let v = at(i, extra + k);
                if v > best {
                    best = v;
                    best_c = k;
                }
            }
            let score = obj * best;
            if score.partial_cmp(&thr) != Some(Ordering::Greater) {
                continue;
            }
            let (cx, cy, w, h) = (at(i, 0), at(i, 1), at(i, 2), at(i, 3));
            let cand = Candidate {
                det: Detection {
                    class_id: best_c as u32,
                    score,
                    x1: cx - w / 2.0,
                    y1: cy - h / 2.0,
                    x2: cx + w / 2.0,
                    y2: cy + h / 2.0,
                },
                order: i as u32,
            };
            // At most one candidate per anchor: the buffer reaches the
            // model's anchor count once and is reused from then on.
            self.cands.push(cand);
        }
        self.cands.sort_unstable_by(by_score_then_order);
        self.cands.truncate(self.top_k);
        nms(&mut self.cands, &self.nms, out);
        for d in out.iter_mut() {
            map_box(d, t, true);
        }
        Ok(())
    }
}

/// One class of a classifier result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassScore {
    /// Class index.
    pub class_id: u32,
    /// Probability (softmax of the logits, computed in f64).
    pub prob: f32,
}

/// Classifier top-k with an optional softmax; keeps its scratch.
#[derive(Debug, Default)]
pub struct TopK {
    probs: Vec<f64>,
    order: Vec<u32>,
}

impl TopK {
    /// Writes the `k` most probable classes of `scores` into `out`
    /// (cleared), most probable first; ties go to the lower class index.
    pub fn decode(&mut self, scores: &[f32], softmax: bool, k: usize, out: &mut Vec<ClassScore>) {
        out.clear();
        self.probs.clear();
        self.probs.extend(scores.iter().map(|&v| v as f64));
        if softmax {
            let m = self.probs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for p in self.probs.iter_mut() {
                *p = (*p - m).exp();
                sum += *p;
            }
            for p in self.probs.iter_mut() {
                *p /= sum;
            }
        }
        let k = k.min(scores.len());
        if k == 0 {
            return;
        }
        self.order.clear();
        self.order.extend(0..scores.len() as u32);
        let probs = &self.probs;
        let cmp = |a: &u32, b: &u32| {
            probs[*b as usize]
                .total_cmp(&probs[*a as usize])
                .then(a.cmp(b))
        };
        self.order.select_nth_unstable_by(k - 1, cmp);
        self.order[..k].sort_unstable_by(cmp);
        out.extend(self.order[..k].iter().map(|&i| ClassScore {
            class_id: i,
            prob: probs[i as usize] as f32,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(w: usize, h: usize) -> ImageTransform {
        ImageTransform {
            src_width: w,
            src_height: h,
            scale_x: 1.0,
            scale_y: 1.0,
            pad_x: 0.0,
            pad_y: 0.0,
        }
    }

    #[test]
    fn iou_follows_tf_rules() {
        assert_eq!(iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 1.0, 3.0, 3.0]), 1.0 / 7.0);
        // Flipped corners are normalised.
        assert_eq!(iou(&[2.0, 2.0, 0.0, 0.0], &[0.0, 0.0, 2.0, 2.0]), 1.0);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 2.0], &[0.0, 0.0, 2.0, 2.0]), 0.0);
    }

    /// Plain-Rust reference for the CenterNet decode: materialise P, sort
    /// all of it, take the top k, then NMS by brute force.
    fn centernet_reference(
        heat: &[f32],
        c: usize,
        h: usize,
        w: usize,
        wh: &[f32],
        k: usize,
        thr: f32,
        iou_t: f32,
        max: usize,
    ) -> Vec<Detection> {
        let mut all = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let v = heat[(ch * h + y) * w + x];
                    let mut m = f32::NEG_INFINITY;
                    for dy in -1i64..=1 {
                        for dx in -1i64..=1 {
                            let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                            if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                                m = m.max(heat[(ch * h + yy as usize) * w + xx as usize]);
                            }
                        }
                    }
                    let p = if v == m { v } else { 0.0 };
                    all.push((p, (y * w + x) * c + ch));
                }
            }
        }
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut kept: Vec<Detection> = Vec::new();
        for &(p, idx) in all.iter().take(k) {
            if p <= thr || kept.len() >= max {
                continue;
            }
            let (ch, x, y) = (idx % c, (idx / c) % w, idx / c / w);
            let g = |q: usize| wh[(q * h + y) * w + x];
            let d = Detection {
                class_id: ch as u32,
                score: p,
                x1: 4.0 * x as f32 - g(0),
                y1: 4.0 * y as f32 - g(1),
                x2: 4.0 * x as f32 + g(2),
                y2: 4.0 * y as f32 + g(3),
            };
            if kept
                .iter()
                .all(|o| iou(&o.bbox(), &d.bbox()) < iou_t as f64)
            {
                kept.push(d);
            }
        }
        kept
    }

    #[test]
    fn centernet_matches_brute_force_reference() {
        let (c, h, w) = (5, 12, 16);
        for seed in 0..20u64 {
            let heat: Vec<f32> = osprey_engine::tune::pseudo_random(c * h * w, seed)
                .into_iter()
                .map(|v| ((v + 1.0) * 4.0).round() / 8.0) // plateaus and ties
                .collect();
            let wh: Vec<f32> = osprey_engine::tune::pseudo_random(4 * h * w, seed + 99)
                .into_iter()
                .map(|v| (v + 1.2) * 10.0)
                .collect();
            let nmsp = NmsParams {
                iou: 0.4,
                max_detections: 10,
                class_agnostic: true,
                rule: Suppress::AtOrAbove,
            };
            let mut dec = CenterNet::new(4, 30, 0.2, nmsp);
            let mut out = Vec::new();
            dec.decode(
                &heat,
                &[1, c, h, w],
                &wh,
                &[1, 4, h, w],
                &ident(64, 48),
                &mut out,
            )
            .unwrap();
            let want = centernet_reference(&heat, c, h, w, &wh, 30, 0.2, 0.4, 10);
            assert_eq!(out, want, "seed {seed}");
            assert!(!out.is_empty());
        }
    }

    #[test]
    fn centernet_rejects_mismatched_outputs() {
        let nmsp = NmsParams {
            iou: 0.4,
            max_detections: 10,
            class_agnostic: true,
            rule: Suppress::AtOrAbove,
        };
        let mut dec = CenterNet::new(4, 100, 0.2, nmsp);
        let mut out = Vec::new();
        let t = ident(8, 8);
        assert!(dec
            .decode(
                &[0.0; 8],
                &[1, 2, 2, 2],
                &[0.0; 12],
                &[1, 3, 2, 2],
                &t,
                &mut out
            )
            .is_err());
        assert!(dec
            .decode(
                &[0.0; 7],
                &[1, 2, 2, 2],
                &[0.0; 16],
                &[1, 4, 2, 2],
                &t,
                &mut out
            )
            .is_err());
        assert!(dec
            .decode(
                &[0.0; 8],
                &[2, 2, 2],
                &[0.0; 16],
                &[1, 4, 2, 2],
                &t,
                &mut out
            )
            .is_err());
    }

    fn yolo_nms() -> NmsParams {
        NmsParams {
            iou: 0.45,
            max_detections: 100,
            class_agnostic: false,
            rule: Suppress::Above,
        }
    }

    #[test]
    fn yolov5_rows_and_class_aware_nms() {
        // Three boxes: two overlapping of class 1 (one suppressed), one of
        // class 0 overlapping them (kept: class-aware), one low objectness.
        let rows = [
            [50.0, 50.0, 20.0, 20.0, 0.9, 0.1, 0.8],
            [52.0, 50.0, 20.0, 20.0, 0.8, 0.2, 0.9],
            [51.0, 50.0, 20.0, 20.0, 0.9, 0.7, 0.1],
            [10.0, 10.0, 4.0, 4.0, 0.1, 0.9, 0.9],
        ];
        let flat: Vec<f32> = rows.iter().flatten().cloned().collect();
        let mut dec = Yolo::new(YoloVersion::V5, 0.25, 300, yolo_nms());
        let mut out = Vec::new();
        dec.decode(&flat, &[1, 4, 7], 2, &ident(100, 100), &mut out)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].class_id, out[0].score), (1, 0.9 * 0.8));
        assert_eq!(out[1].class_id, 0);
        assert!((out[1].score - 0.63).abs() < 1e-6);
        assert_eq!(out[0].bbox(), [40.0, 40.0, 60.0, 60.0]);
        // Class-agnostic: the class-0 box goes too.
        dec.nms.class_agnostic = true;
        dec.decode(&flat, &[1, 4, 7], 2, &ident(100, 100), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        // Wrong class count.
        assert!(dec
            .decode(&flat, &[1, 4, 7], 3, &ident(100, 100), &mut out)
            .is_err());
    }

    #[test]
    fn yolov8_channel_major_letterbox_and_clip() {
        // Two anchors, 3 classes, channel-major [1, 7, 2].
        let n = 2;
        let mut y = vec![0.0f32; 7 * n];
        let set = |y: &mut Vec<f32>, i: usize, v: [f32; 7]| {
            for (k, x) in v.iter().enumerate() {
                y[k * n + i] = *x;
            }
        };
        set(&mut y, 0, [320.0, 320.0, 100.0, 50.0, 0.1, 0.2, 0.6]);
        set(&mut y, 1, [5.0, 150.0, 20.0, 20.0, 0.5, 0.1, 0.1]);
        // 1280x720 letterboxed into 640x640: scale 2, pad_y 140.
        let t = ImageTransform {
            src_width: 1280,
            src_height: 720,
            scale_x: 2.0,
            scale_y: 2.0,
            pad_x: 0.0,
            pad_y: 140.0,
        };
        let mut dec = Yolo::new(YoloVersion::V8, 0.25, 300, yolo_nms());
        let mut out = Vec::new();
        dec.decode(&y, &[1, 7, n], 3, &t, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].class_id, 2);
        assert_eq!(out[0].bbox(), [540.0, 310.0, 740.0, 410.0]);
        // Second box crosses the left edge: clipped to 0.
        assert_eq!(out[1].bbox(), [0.0, 0.0, 30.0, 40.0]);
        // The same data transposed to [1, N, 7] decodes the same.
        let mut yt = vec![0.0f32; 7 * n];
        for i in 0..n {
            for k in 0..7 {
                yt[i * 7 + k] = y[k * n + i];
            }
        }
        let mut out2 = Vec::new();
        dec.decode(&yt, &[1, n, 7], 3, &t, &mut out2).unwrap();
        assert_eq!(out, out2);
    }

    #[test]
    fn topk_softmax_matches_direct_computation() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let mut k = TopK::default();
        let mut out = Vec::new();
        k.decode(&logits, true, 3, &mut out);
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        assert_eq!(
            out.iter().map(|c| c.class_id).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        assert!((out[0].prob as f64 - 3f64.exp() / z).abs() < 1e-7);
        k.decode(&logits, false, 10, &mut out);
        assert_eq!(out.len(), 5);
        assert_eq!(out[4].prob, -1.0);
    }
}
