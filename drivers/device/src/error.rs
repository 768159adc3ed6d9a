//! Errors of the device layer.

/// What went wrong with a device.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device name does not parse (`cpu:0`, `cuda:1`).
    #[error("bad device `{spec}`: {reason}")]
    BadSpec {
        /// The text given.
        spec: String,
        /// Why it is not a device.
        reason: String,
    },
    /// A CUDA device was requested from a build without the `cuda` feature.
    #[error("device `{0}` needs CUDA, but this llmos was built without CUDA (rebuild with `--features cuda`)")]
    BuiltWithoutCuda(String),
    /// The CUDA device does not exist or could not be opened.
    #[error("cannot open device `{device}`: {reason}")]
    Unavailable {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
    /// The device was lost (probe failed, fatal compute error, or injected fault); it stays
    /// unusable for the life of the process.
    #[error("device `{device}` is lost: {reason}")]
    Lost {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
}
