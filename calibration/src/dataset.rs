//! Calibration inputs: a folder of images (recursive; JPEG/PNG) turned into
//! input tensors exactly as the model expects them (its model description:
//! size, resize mode and filter, channel order, normalisation, layout), or
//! a folder of already preprocessed `.npy` tensors. A file that cannot be
//! used is reported to the caller, which skips and counts it.

use std::path::{Path, PathBuf};

use osprey_models::vision::desc::ModelDesc;
use osprey_models::vision::{read_image, FrameLimits, Preprocessor};

use crate::{CalibError, Result};

/// Where samples come from.
#[derive(Debug)]
enum Kind {
    Images(Box<Preprocessor>),
    Npy,
}

/// An ordered list of calibration files and how to read them.
#[derive(Debug)]
pub struct Dataset {
    files: Vec<PathBuf>,
    kind: Kind,
    limits: FrameLimits,
}

/// Files under `dir` (recursively) whose extension is one of `exts`, in
/// path order.
pub fn files_with(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|error| CalibError::Io {
            path: d.display().to_string(),
            error,
        })?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl Dataset {
    /// Images under `dir`, preprocessed per `desc`; at most `max` files.
    pub fn images(dir: &Path, desc: &ModelDesc, max: Option<usize>) -> Result<Dataset> {
        let mut files = files_with(dir, &["jpg", "jpeg", "png"])?;
        if files.is_empty() {
            return Err(CalibError::Dataset(format!(
                "{}: no .jpg/.jpeg/.png images (searched recursively)",
                dir.display()
            )));
        }
        if let Some(m) = max {
            files.truncate(m);
        }
        Ok(Dataset {
            files,
            kind: Kind::Images(Box::new(Preprocessor::new(desc.preprocess_spec())?)),
            limits: FrameLimits::default(),
        })
    }

    /// Preprocessed tensors (`.npy`, any float dtype) under `dir`.
    pub fn npy(dir: &Path, max: Option<usize>) -> Result<Dataset> {
        let mut files = files_with(dir, &["npy"])?;
        if files.is_empty() {
            return Err(CalibError::Dataset(format!(
                "{}: no .npy files (searched recursively)",
                dir.display()
            )));
        }
        if let Some(m) = max {
            files.truncate(m);
        }
        Ok(Dataset {
            files,
            kind: Kind::Npy,
            limits: FrameLimits::default(),
        })
    }

    /// The files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Writes sample `i` into `out` (the model input, `out.len()` values).
    /// An error means this file is unusable (skip and count it).
    pub fn load(&mut self, i: usize, out: &mut [f32]) -> std::result::Result<(), String> {
        let path = self.files.get(i).ok_or("no such sample")?;
        match &mut self.kind {
            Kind::Images(pre) => {
                let img = read_image(path, &self.limits).map_err(|e| e.to_string())?;
                pre.run(&img.frame(), out).map_err(|e| e.to_string())?;
                Ok(())
            }
            Kind::Npy => {
                let a = osprey_engine::npy::read(path, true).map_err(|e| e.to_string())?;
                if a.data.len() != out.len() {
                    return Err(format!(
                        "shape {:?} ({} values) does not fit the model input ({} values)",
                        a.shape,
                        a.data.len(),
                        out.len()
                    ));
                }
                out.copy_from_slice(&a.data);
                Ok(())
            }
        }
    }
}
