//! KV-cache memory: the [`KvStore`] contract the model forward reads and writes K/V
//! through, a contiguous per-sequence store, and the paged block pool — fixed-size blocks
//! in anonymous memory or a memory-mapped file, per-sequence block tables ([`PagedKv`]),
//! and restore of a sequence's verified prefix after a crash ([`SharedPool::restore`]).

mod error;
mod layout;
mod paged;
mod pool;
mod store;
#[cfg(test)]
mod tests;

pub use error::KvError;
pub use paged::{PagedKv, Restored};
pub use pool::{Backing, BlockId, BlockPool, PoolConfig, PoolOrigin, PoolStats, SharedPool};
pub use store::{ContiguousKv, KvDtype, KvRows, KvShape, KvStore, KvView};
