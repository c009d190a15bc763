//! Lanes: latest-wins frame slots and the earliest-deadline-first pick.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) buf: usize,
    pub(super) deadline: Instant,
    pub(super) capture_ns: u64,
    pub(super) received: Instant,
}

/// One (model, camera) pair.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) model: usize,
    pub(super) local: usize,
    pub(super) camera: String,
    pub(super) deadline: Duration,
    pub(super) priority: i32,
    pub(super) free: Vec<usize>,
    pub(super) pending: Option<Pending>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Run,
    Drain,
    Now,
}

#[derive(Debug)]
pub(super) struct AsstJob {
    pub(super) ready: bool,
    pub(super) running: bool,
    pub(super) deadline: Instant,
}

#[derive(Debug)]
pub(super) struct LaneState {
    pub(super) slots: Vec<Slot>,
    pub(super) assistant: Option<AsstJob>,
    pub(super) running: usize,
    pub(super) stop: Stop,
}

pub(super) enum Job {
    Frame { slot: usize, p: Pending },
    Assistant,
}

/// A lane: workers running EDF over the lane's slots (and the assistant).
#[derive(Debug)]
pub(super) struct Lane {
    pub(super) name: String,
    /// Global model index of each local model.
    pub(super) models: Vec<usize>,
    /// Packet buffers of each slot.
    pub(super) bufs: Vec<Vec<Mutex<Vec<u8>>>>,
    pub(super) state: Mutex<LaneState>,
    pub(super) cv: Condvar,
    /// Each worker's perceivers, by local model.
    pub(super) workers: Vec<Mutex<Vec<Perceiver>>>,
    /// Milliseconds since start at each worker's last loop.
    pub(super) heartbeats: Vec<AtomicU64>,
}

/// The ready job with the earliest deadline (priority breaks ties).
pub(super) fn pick(st: &mut LaneState) -> Option<Job> {
    let mut best: Option<(Instant, i32, Option<usize>)> = None;
    for (i, s) in st.slots.iter().enumerate() {
        if let Some(p) = &s.pending {
            let key = (p.deadline, s.priority);
            if best.is_none_or(|(d, pr, _)| key < (d, pr)) {
                best = Some((key.0, key.1, Some(i)));
            }
        }
    }
    if let Some(j) = &st.assistant {
        if j.ready && !j.running && best.is_none_or(|(d, _, _)| j.deadline < d) {
            best = Some((j.deadline, i32::MAX, None));
        }
    }
    match best? {
        (_, _, Some(i)) => {
            let p = st.slots[i].pending.take()?;
            Some(Job::Frame { slot: i, p })
        }
        (_, _, None) => {
            let j = st.assistant.as_mut()?;
            j.ready = false;
            j.running = true;
            Some(Job::Assistant)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(model: usize, priority: i32) -> Slot {
        Slot {
            model,
            local: model,
            camera: "c".into(),
            deadline: Duration::from_millis(100),
            priority,
            free: vec![1, 2],
            pending: None,
        }
    }

    fn pending(at: Instant, ms: u64) -> Pending {
        Pending {
            buf: 0,
            deadline: at + Duration::from_millis(ms),
            capture_ns: 0,
            received: at,
        }
    }

    #[test]
    fn earliest_deadline_first_then_priority_then_the_assistant() {
        let t = Instant::now();
        let mut st = LaneState {
            slots: vec![slot(0, 0), slot(1, 5), slot(2, -1)],
            assistant: Some(AsstJob {
                ready: true,
                running: false,
                deadline: t + Duration::from_millis(60),
            }),
            running: 0,
            stop: Stop::Run,
        };
        st.slots[0].pending = Some(pending(t, 80));
        st.slots[1].pending = Some(pending(t, 30));
        st.slots[2].pending = Some(pending(t, 30));
        let order: Vec<String> = std::iter::from_fn(|| pick(&mut st))
            .map(|j| match j {
                Job::Frame { slot, .. } => format!("frame{slot}"),
                Job::Assistant => "assistant".into(),
            })
            .collect();
        // Equal deadlines: the lower priority number first; the assistant
        // step (60 ms) before the 80 ms frame; it is not picked again
        // while running.
        assert_eq!(order, ["frame2", "frame1", "assistant", "frame0"]);
    }
}
