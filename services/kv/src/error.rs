//! Errors of KV-cache memory.

/// What went wrong in KV-cache memory.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The pool has fewer free blocks than the sequence needs: the scheduler must wait,
    /// preempt or refuse; nothing was allocated.
    #[error("out of KV blocks: need {needed}, {free} free of {total}")]
    OutOfBlocks {
        /// Blocks the request needed.
        needed: usize,
        /// Blocks free.
        free: usize,
        /// Blocks in the pool.
        total: usize,
    },
    /// A write or read outside what was reserved or written.
    #[error("KV access out of range: {0}")]
    OutOfRange(String),
    /// Tensor shapes or dtypes do not match the store's shape.
    #[error("KV shape mismatch: {0}")]
    Shape(String),
    /// A tensor operation failed.
    #[error("tensor error in KV store: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The backing file could not be created, mapped or synced.
    #[error("KV pool file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Configuration is invalid (zero blocks, budget too small for one block…).
    #[error("invalid KV pool configuration: {0}")]
    Config(String),
    /// The pool file is not a usable pool (truncated, foreign, damaged superblock): nothing
    /// in it is trusted. [`crate::BlockPool::new`] starts an empty pool over such a file;
    /// [`crate::BlockPool::open_existing`] reports it.
    #[error("KV pool file {path} is unusable: {reason}")]
    Corrupt {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A sequence with this id already holds blocks in the pool: two views writing the same
    /// sequence's blocks would make restore ambiguous.
    #[error("KV sequence {0} is already open in this pool")]
    SequenceInUse(u64),
    /// A block handed to [`crate::BlockPool::free`] was not allocated by
    /// [`crate::BlockPool::allocate`] (double free, or a block a sequence owns); nothing was
    /// freed.
    #[error("block {0} is not held through BlockPool::allocate")]
    NotHeld(u32),
}
