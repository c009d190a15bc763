//! SIGHUP: a new config applied without dropping topics.

use super::*;

impl super::Core {
    /// Applies a new config without dropping topics: engines whose files
    /// or settings changed are loaded and swapped in between jobs;
    /// deadlines and priorities change in place. Changes that need new
    /// pools or topics are reported as needing a restart. Returns one line
    /// per change.
    pub fn reload(&self, new: Config) -> Result<Vec<String>> {
        let old = self.cfg().clone();
        let mut notes = Vec::new();
        let mut restart = Vec::new();
        if new.robot != old.robot {
            restart.push("robot".to_string());
        }
        if new.zenoh != old.zenoh {
            restart.push("[zenoh]".into());
        }
        if new.pools != old.pools {
            restart.push("[pools]".into());
        }
        if new.scheduler.lanes != old.scheduler.lanes {
            restart.push("[scheduler] lanes".into());
        }
        if new.assistant != old.assistant {
            restart.push("[assistant]".into());
        }
        let names_new: Vec<&str> = new.models.iter().map(|m| m.name.as_str()).collect();
        if names_new != self.names.iter().map(String::as_str).collect::<Vec<_>>() {
            restart.push("the list of models".into());
        }
        // Swaps first (loading can fail: then nothing changes).
        let mut swaps = Vec::new();
        let stamps = lock(&self.stamps).clone();
        for (mi, (om, nm)) in old.models.iter().zip(&new.models).enumerate() {
            if om.name != nm.name {
                continue;
            }
            if om.lane != nm.lane || om.cameras != nm.cameras || om.output != nm.output {
                restart.push(format!("model {:?} lane, cameras or output", nm.name));
                continue;
            }
            let stamp = Stamp::of(nm);
            if stamp != stamps[mi] {
                let lane = self
                    .lanes
                    .iter()
                    .position(|l| l.models.contains(&mi))
                    .ok_or_else(|| anyhow!("model {:?} has no lane", nm.name))?;
                let ps = load_perceivers(nm, self.lanes[lane].workers.len())?;
                swaps.push((mi, lane, ps, stamp));
            }
        }
        for (mi, li, ps, stamp) in swaps {
            let lane = &self.lanes[li];
            let local = lane.models.iter().position(|&m| m == mi).unwrap_or(0);
            for (w, p) in ps.into_iter().enumerate() {
                if let Some(slot) = lock(&lane.workers[w]).get_mut(local) {
                    *slot = p;
                }
            }
            lock(&self.stamps)[mi] = stamp;
            notes.push(format!(
                "model {:?}: engine reloaded and swapped in",
                self.names[mi]
            ));
        }
        for lane in &self.lanes {
            let mut st = lock(&lane.state);
            for slot in &mut st.slots {
                if let Some(nm) = new
                    .models
                    .get(slot.model)
                    .filter(|m| m.name == self.names[slot.model])
                {
                    let d = Duration::from_millis(nm.deadline_ms);
                    if d != slot.deadline || nm.priority != slot.priority {
                        notes.push(format!(
                            "model {:?} camera {:?}: deadline {} ms, priority {}",
                            nm.name, slot.camera, nm.deadline_ms, nm.priority
                        ));
                        slot.deadline = d;
                        slot.priority = nm.priority;
                    }
                }
            }
        }
        for r in restart {
            notes.push(format!("{r} changed: restart ospreyd to apply"));
        }
        let mut keep = new;
        // Keep what was not applied, so the next reload compares against
        // what is running.
        keep.zenoh = old.zenoh;
        keep.pools = old.pools;
        keep.scheduler.lanes = old.scheduler.lanes;
        keep.assistant = old.assistant;
        keep.robot = old.robot;
        if keep.models.len() == old.models.len() {
            for (k, o) in keep.models.iter_mut().zip(&old.models) {
                if k.name != o.name || k.lane != o.lane || k.cameras != o.cameras {
                    *k = o.clone();
                }
                k.output = o.output.clone();
            }
        } else {
            keep.models = old.models;
        }
        *self
            .cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keep;
        Ok(notes)
    }
}
