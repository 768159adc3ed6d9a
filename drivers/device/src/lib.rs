//! Logical compute devices: a CPU backend on candle and a CUDA backend behind the `cuda`
//! feature, each with a health probe and a sticky "lost" state, so failover between
//! devices is real and testable without a GPU. Nothing above this crate needs `cfg`.

mod cpu_threads;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod error;
mod id;

pub use cpu_threads::init_cpu_threads;
pub use device::{Health, LogicalDevice, MemoryInfo, DEVICE_LOST_POINT};
pub use error::DeviceError;
pub use id::{parse_device_list, DeviceId, DeviceKind};
