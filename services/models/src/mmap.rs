//! Read-only memory maps of model files: the one place this crate needs `unsafe`.

use std::path::Path;

use memmap2::Mmap;

use crate::error::ModelError;

/// Maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is only read. A model file changed or truncated by another process
    // while mapped is outside the contract (files are immutable once published, as in
    // every mmap-based loader); tensors are copied out during loading, so the map does not
    // outlive the load.
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    Ok(map)
}

/// Maps one safetensors shard through candle's wrapper (which owns its own map).
pub(crate) fn map_safetensors(
    path: &Path,
) -> Result<candle_core::safetensors::MmapedSafetensors, candle_core::Error> {
    // SAFETY: as for `map_file`: read-only, files are immutable while loaded.
    #[allow(unsafe_code)]
    unsafe {
        candle_core::safetensors::MmapedSafetensors::new(path)
    }
}
