//! # osprey-calibration
//!
//! INT8 calibration (datasets, activation statistics, entropy/percentile/
//! min-max thresholds, calibration caches, accuracy reports) lands here with
//! the INT8 issue. Today it only re-exports the model layer it will build on.

pub use osprey_models as models;
