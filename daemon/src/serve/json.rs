//! Detection JSON written into a reused buffer (allocation-free).

use super::*;

/// A JSON number (non-finite values become null).
pub(super) fn num(v: f32) -> JsonNum {
    JsonNum(v)
}

pub(super) struct JsonNum(f32);

impl std::fmt::Display for JsonNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_finite() {
            write!(f, "{}", self.0)
        } else {
            f.write_str("null")
        }
    }
}

pub(super) fn write_label(out: &mut Vec<u8>, labels: &[String], id: u32) -> Result<()> {
    match labels.get(id as usize) {
        Some(l) => serde_json::to_writer(&mut *out, l.as_str())?,
        None => write!(out, "\"class {id}\"")?,
    }
    Ok(())
}

/// `,"detections":[{"label","class_id","score","box":[x1,y1,x2,y2]},...]`
pub(super) fn write_detections(
    out: &mut Vec<u8>,
    dets: &[osprey_models::vision::Detection],
    labels: &[String],
) -> Result<()> {
    write_list(
        out,
        "detections",
        dets,
        labels,
        |d| d.class_id,
        |out, d| {
            write!(
                out,
                ",\"score\":{},\"box\":[{},{},{},{}]}}",
                num(d.score),
                num(d.x1),
                num(d.y1),
                num(d.x2),
                num(d.y2)
            )
        },
    )
}

/// `,"classes":[{"label","class_id","prob"},...]`
pub(super) fn write_classes(
    out: &mut Vec<u8>,
    classes: &[osprey_models::vision::ClassScore],
    labels: &[String],
) -> Result<()> {
    write_list(
        out,
        "classes",
        classes,
        labels,
        |c| c.class_id,
        |out, c| write!(out, ",\"prob\":{}}}", num(c.prob)),
    )
}

/// `,"key":[...]`: each item opens with its label and class id, and
/// `rest` writes its other fields and the closing brace.
fn write_list<T>(
    out: &mut Vec<u8>,
    key: &str,
    items: &[T],
    labels: &[String],
    class_id: impl Fn(&T) -> u32,
    rest: impl Fn(&mut Vec<u8>, &T) -> std::io::Result<()>,
) -> Result<()> {
    write!(out, ",\"{key}\":[")?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"label\":");
        let id = class_id(item);
        write_label(out, labels, id)?;
        write!(out, ",\"class_id\":{id}")?;
        rest(out, item)?;
    }
    out.push(b']');
    Ok(())
}

pub(super) fn write_head(
    out: &mut Vec<u8>,
    model: &str,
    camera: &str,
    h: &packet::Header,
) -> Result<()> {
    out.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut *out, model)?;
    out.extend_from_slice(b",\"camera\":");
    serde_json::to_writer(&mut *out, camera)?;
    let enc = h.encoding.name();
    write!(
        out,
        ",\"seq\":{},\"capture_ns\":{},\"width\":{},\"height\":{},\"encoding\":\"{enc}\"",
        h.seq, h.capture_ns, h.width, h.height
    )?;
    Ok(())
}

/// `latency_ms`: the `osprey detect` stages, plus `queue` (arrival to
/// dispatch: waiting for a worker) and `end_to_end` (capture to publish).
pub(super) fn write_latency(
    out: &mut Vec<u8>,
    t: &StageTimes,
    queue_ms: f64,
    e2e_ms: f64,
) -> Result<()> {
    write!(
        out,
        ",\"latency_ms\":{{\"preprocess\":{:.4},\"infer\":{:.4},\"decode\":{:.4},\"total\":{:.4},\"runs\":1,\"queue\":{:.4},\"end_to_end\":{:.4}}}}}",
        t.preprocess_ms,
        t.infer_ms,
        t.decode_ms,
        t.total_ms(),
        queue_ms,
        e2e_ms
    )?;
    Ok(())
}
