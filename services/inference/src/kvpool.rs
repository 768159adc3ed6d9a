//! Each device's KV block pool as the inference services use it: a memory-mapped file in
//! the state directory (so sealed K/V outlive the process), tagged with the weights'
//! content fingerprint so K/V of other weights are never restored.

use std::sync::atomic::{AtomicU64, Ordering};

use llmos_device::DeviceId;
use llmos_kv::{Backing, BlockPool, KvShape, PagedKv, PoolConfig, PoolStats, SharedPool};

use crate::config::RuntimeConfig;
use crate::error::InferenceError;

/// A sequence's KV in a device pool.
pub type SeqKv = PagedKv;

/// One device's block pool. Clones share it.
#[derive(Clone)]
pub struct DevicePool {
    pool: SharedPool,
    block_tokens: usize,
}

impl DevicePool {
    /// Opens (or creates) `DIR/kv-<device>.pool` for `shape`, sized by the configured budget,
    /// tagged with the model's content fingerprint.
    pub(crate) fn open(
        config: &RuntimeConfig,
        shape: KvShape,
        device: DeviceId,
        model_fingerprint: u64,
    ) -> Result<Self, InferenceError> {
        let file = format!("kv-{}.pool", device.to_string().replace(':', "-"));
        let pool_config = PoolConfig::new(
            shape,
            config.block_tokens,
            config.kv_budget_bytes as u64,
            Backing::File(config.state_dir.join(file)),
        )
        .with_model_tag(model_fingerprint)
        .with_dtype(config.kv_dtype);
        let pool = BlockPool::new(pool_config)?;
        Ok(Self {
            pool: SharedPool::new(pool),
            block_tokens: config.block_tokens,
        })
    }

    /// Takes back sequence `seq` for `tokens`: the verified prefix of its sealed blocks (0
    /// when nothing verifies) and the sequence view to continue in.
    pub fn restore(&self, seq: u64, tokens: &[u32]) -> Result<(SeqKv, usize), InferenceError> {
        match self.pool.restore(seq, tokens) {
            Ok(restored) => Ok((restored.kv, restored.valid_len)),
            // An abandoned (hung) engine thread still holds the sequence and may never let
            // go: recompute under a fresh pool id. Its blocks return when the process ends.
            Err(llmos_kv::KvError::SequenceInUse(_)) => {
                static SALT: AtomicU64 = AtomicU64::new(1);
                let alias = seq ^ (SALT.fetch_add(1, Ordering::Relaxed) << 48);
                tracing::warn!(
                    seq,
                    alias,
                    "KV sequence held by an abandoned engine; recomputing"
                );
                Ok((self.pool.sequence(alias)?, 0))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Positions the whole pool holds: the longest sequence it can ever take.
    pub fn capacity_positions(&self) -> usize {
        self.pool.stats().total * self.block_tokens
    }

    /// Block usage.
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }
}
