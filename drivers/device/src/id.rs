//! Device names: `cpu:N` and `cuda:N`, and lists of them (`--devices cpu:0,cpu:1`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::DeviceError;

/// The backend of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Host CPU through candle's CPU backend.
    Cpu,
    /// An NVIDIA GPU through candle's CUDA backend.
    Cuda,
}

/// A logical device: backend plus ordinal. Several logical CPU devices may share the
/// host CPU; each has its own health, KV pool and engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId {
    /// Backend.
    pub kind: DeviceKind,
    /// Ordinal within the backend.
    pub ordinal: usize,
}

impl DeviceId {
    /// `cpu:N`.
    pub fn cpu(ordinal: usize) -> Self {
        Self {
            kind: DeviceKind::Cpu,
            ordinal,
        }
    }

    /// `cuda:N`.
    pub fn cuda(ordinal: usize) -> Self {
        Self {
            kind: DeviceKind::Cuda,
            ordinal,
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        };
        write!(f, "{kind}:{}", self.ordinal)
    }
}

impl FromStr for DeviceId {
    type Err = DeviceError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| DeviceError::BadSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = spec.trim();
        let (kind, ordinal) = match trimmed.split_once(':') {
            Some((kind, ordinal)) => (kind, ordinal),
            None => (trimmed, "0"),
        };
        let kind = match kind.to_ascii_lowercase().as_str() {
            "cpu" => DeviceKind::Cpu,
            "cuda" | "gpu" => DeviceKind::Cuda,
            "" => return Err(bad("empty device name")),
            _ => return Err(bad("expected `cpu:N` or `cuda:N`")),
        };
        let ordinal = ordinal
            .parse::<usize>()
            .map_err(|_| bad("the ordinal after `:` must be a non-negative integer"))?;
        Ok(Self { kind, ordinal })
    }
}

/// Parses `cpu:0,cpu:1` (order kept: it is the placement preference); duplicates are an
/// error.
pub fn parse_device_list(list: &str) -> Result<Vec<DeviceId>, DeviceError> {
    let mut devices = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let id: DeviceId = part.parse()?;
        if devices.contains(&id) {
            return Err(DeviceError::BadSpec {
                spec: list.to_string(),
                reason: format!("`{id}` is listed twice"),
            });
        }
        devices.push(id);
    }
    if devices.is_empty() {
        return Err(DeviceError::BadSpec {
            spec: list.to_string(),
            reason: "no device given".into(),
        });
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_device_names() {
        assert_eq!("cpu:1".parse::<DeviceId>().unwrap(), DeviceId::cpu(1));
        assert_eq!("CUDA:0".parse::<DeviceId>().unwrap(), DeviceId::cuda(0));
        assert_eq!("cpu".parse::<DeviceId>().unwrap(), DeviceId::cpu(0));
        assert_eq!(DeviceId::cuda(3).to_string(), "cuda:3");
        assert!("tpu:0".parse::<DeviceId>().is_err());
        assert!("cpu:-1".parse::<DeviceId>().is_err());
    }

    #[test]
    fn parses_lists_in_order_and_rejects_duplicates() {
        assert_eq!(
            parse_device_list("cuda:0, cpu:0").unwrap(),
            vec![DeviceId::cuda(0), DeviceId::cpu(0)]
        );
        assert!(parse_device_list("cpu:0,cpu:0").is_err());
        assert!(parse_device_list(" , ").is_err());
    }
}
