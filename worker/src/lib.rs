//! tidepool-worker (in progress)
pub mod config;
pub mod error;
pub mod model;
pub use config::{DeviceChoice, ServeConfig, SynthConfig};
pub use error::Error;
pub mod synth;
#[cfg(test)]
mod test_support;
