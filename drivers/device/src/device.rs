//! A logical device: its candle device, a health probe, and a sticky lost state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::DeviceError;
use crate::id::{DeviceId, DeviceKind};

/// Fault point that makes a device unusable: `device.lost=…` hits any device checked,
/// `device.lost:cpu:1=…` only that one. Use the `return` action; the loss is sticky.
pub const DEVICE_LOST_POINT: &str = "device.lost";

/// Memory of a device, where the backend can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryInfo {
    /// Free bytes.
    pub free: u64,
    /// Total bytes.
    pub total: u64,
}

/// The health of a device as last observed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Health {
    /// The device.
    pub device: DeviceId,
    /// Usable.
    pub healthy: bool,
    /// Why not, when it is not.
    pub reason: Option<String>,
    /// Memory, where known.
    pub memory: Option<MemoryInfo>,
}

/// One logical compute device. Cheap to clone; clones share the health state.
#[derive(Clone, Debug)]
pub struct LogicalDevice {
    id: DeviceId,
    candle: Device,
    lost: Arc<AtomicBool>,
    lost_reason: Arc<Mutex<Option<String>>>,
}

impl LogicalDevice {
    /// Opens a device. A CUDA device in a build without the `cuda` feature is
    /// [`DeviceError::BuiltWithoutCuda`].
    pub fn open(id: DeviceId) -> Result<Self, DeviceError> {
        llmos_kernel::faults::declare(
            DEVICE_LOST_POINT,
            "a device becomes unusable (`device.lost:cpu:1=return` for one device)",
        );
        let candle = match id.kind {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => open_cuda(id)?,
        };
        Ok(Self {
            id,
            candle,
            lost: Arc::new(AtomicBool::new(false)),
            lost_reason: Arc::new(Mutex::new(None)),
        })
    }

    /// Its name.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The candle device to compute on.
    pub fn candle(&self) -> &Device {
        &self.candle
    }

    /// Marks the device lost for the rest of the process (after a fatal compute error).
    pub fn mark_lost(&self, reason: &str) {
        let mut slot = self.lost_reason.lock().unwrap_or_else(|e| e.into_inner());
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(device = %self.id, %reason, "device lost");
            *slot = Some(reason.to_string());
        }
    }

    /// Cheap check before each unit of work: `Err(Lost)` once the device is lost. Evaluates
    /// the `device.lost` fault points.
    pub fn check(&self) -> Result<(), DeviceError> {
        if let Some(reason) = injected_loss(self.id) {
            self.mark_lost(&reason);
        }
        if self.lost.load(Ordering::Acquire) {
            let reason = self
                .lost_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(DeviceError::Lost {
                device: self.id.to_string(),
                reason,
            });
        }
        Ok(())
    }

    /// Full health probe: the loss check plus a small computation on the device whose
    /// result is verified; a failed probe marks the device lost.
    pub fn probe(&self) -> Health {
        let result = self.check().and_then(|()| {
            self.compute_probe().map_err(|reason| {
                self.mark_lost(&reason);
                DeviceError::Lost {
                    device: self.id.to_string(),
                    reason,
                }
            })
        });
        Health {
            device: self.id,
            healthy: result.is_ok(),
            reason: result.err().map(|e| e.to_string()),
            memory: self.memory(),
        }
    }

    /// Whether the device has not been lost (without probing).
    pub fn is_healthy(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
    }

    /// Free and total memory, where the backend can tell (CUDA); `None` on the CPU.
    pub fn memory(&self) -> Option<MemoryInfo> {
        match self.id.kind {
            DeviceKind::Cpu => None,
            DeviceKind::Cuda => cuda_memory(self),
        }
    }

    fn compute_probe(&self) -> Result<(), String> {
        let run = || -> candle_core::Result<f32> {
            let a = Tensor::arange(0f32, 16., &self.candle)?.reshape((4, 4))?;
            a.matmul(&a.t()?)?.sum_all()?.to_scalar::<f32>()
        };
        match run() {
            // Σ_ij (A·Aᵀ)_ij = |column sums of A|² = 24² + 28² + 32² + 36² for A = 0..16 as 4×4.
            Ok(sum) if (sum - 3680.0).abs() < 1e-3 => Ok(()),
            Ok(sum) => Err(format!("probe computed {sum}, expected 3680")),
            Err(err) => Err(format!("probe failed: {err}")),
        }
    }
}

fn injected_loss(id: DeviceId) -> Option<String> {
    let specific = format!("{DEVICE_LOST_POINT}:{id}");
    let hit = [DEVICE_LOST_POINT, specific.as_str()]
        .into_iter()
        .find_map(fail_eval);
    hit
}

fn fail_eval(point: &str) -> Option<String> {
    llmos_kernel::__fail::eval(point, |_| format!("injected fault ({point})"))
}

#[cfg(feature = "cuda")]
fn open_cuda(id: DeviceId) -> Result<Device, DeviceError> {
    crate::cuda::open(id)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(id: DeviceId) -> Result<Device, DeviceError> {
    Err(DeviceError::BuiltWithoutCuda(id.to_string()))
}

#[cfg(feature = "cuda")]
fn cuda_memory(device: &LogicalDevice) -> Option<MemoryInfo> {
    crate::cuda::memory(device.id())
}

#[cfg(not(feature = "cuda"))]
fn cuda_memory(_device: &LogicalDevice) -> Option<MemoryInfo> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_devices_probe_healthy_and_stay_lost_once_lost() {
        let dev = LogicalDevice::open(DeviceId::cpu(7)).unwrap();
        assert!(dev.probe().healthy);
        dev.mark_lost("test");
        let health = dev.probe();
        assert!(!health.healthy);
        assert!(health.reason.unwrap().contains("test"));
        assert!(matches!(dev.check(), Err(DeviceError::Lost { .. })));
    }

    #[test]
    fn the_fault_point_loses_only_the_named_device() {
        let a = LogicalDevice::open(DeviceId::cpu(41)).unwrap();
        let b = LogicalDevice::open(DeviceId::cpu(42)).unwrap();
        llmos_kernel::faults::configure("device.lost:cpu:42", "return").unwrap();
        assert!(a.check().is_ok());
        assert!(b.check().is_err());
        llmos_kernel::faults::clear("device.lost:cpu:42");
        assert!(b.check().is_err(), "loss is sticky");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = LogicalDevice::open(DeviceId::cuda(0)).unwrap_err();
        assert!(err.to_string().contains("built without CUDA"), "{err}");
    }
}
