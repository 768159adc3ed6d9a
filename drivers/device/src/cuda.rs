//! The CUDA backend (feature `cuda`): discovery and memory through cudarc, compute through
//! candle's CUDA device.

use candle_core::Device;

use crate::device::MemoryInfo;
use crate::error::DeviceError;
use crate::id::DeviceId;

pub(crate) fn open(id: DeviceId) -> Result<Device, DeviceError> {
    let count =
        cudarc::driver::CudaContext::device_count().map_err(|err| DeviceError::Unavailable {
            device: id.to_string(),
            reason: format!("CUDA driver: {err}"),
        })?;
    if id.ordinal >= count as usize {
        return Err(DeviceError::Unavailable {
            device: id.to_string(),
            reason: format!("only {count} CUDA device(s) present"),
        });
    }
    Device::new_cuda(id.ordinal).map_err(|err| DeviceError::Unavailable {
        device: id.to_string(),
        reason: err.to_string(),
    })
}

pub(crate) fn memory(id: DeviceId) -> Option<MemoryInfo> {
    let ctx = cudarc::driver::CudaContext::new(id.ordinal).ok()?;
    ctx.bind_to_thread().ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some(MemoryInfo {
        free: free as u64,
        total: total as u64,
    })
}
