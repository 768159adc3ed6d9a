//! The block pool: a fixed number of fixed-size K/V blocks in one mapping (a file in the
//! state directory, or anonymous memory), the free list, and who holds which block —
//! including blocks whose sequence is gone but whose sealed contents stay restorable until
//! their space is needed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::MmapMut;

use crate::error::KvError;
use crate::layout::{self, BlockMeta, Geometry, META_BYTES, SUPER_BYTES, SUPER_USED};
use crate::store::{KvDtype, KvShape};

/// One block of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub(crate) u32);

impl BlockId {
    /// The block's number, `0..total`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where the pool's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory: gone with the process. Pages are committed as blocks are first
    /// touched, so a large budget costs nothing until used.
    Memory,
    /// A memory-mapped file (in the state directory), created or reopened: what was sealed
    /// in it outlives the process and can be restored by the next one.
    File(PathBuf),
}

/// How to build a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Shape of every sequence's cache in this pool.
    pub shape: KvShape,
    /// Positions per block.
    pub block_tokens: usize,
    /// Memory for K/V data: the pool has `budget_bytes / bytes_per_block` blocks (at least
    /// one, or construction fails). Block records (64 bytes each) come on top.
    pub budget_bytes: u64,
    /// Where the bytes live.
    pub backing: Backing,
    /// Identifies the weights the K/V are computed with (a hash of the model file, say).
    /// K/V are a function of the tokens *and* the weights, so a pool file written under
    /// another tag is not reused. 0 when there is one model.
    pub model_tag: u64,
    /// How K/V elements are stored: f32, or f16 (half the memory and bandwidth; the
    /// forward reads them back as f32).
    pub dtype: KvDtype,
}

impl PoolConfig {
    /// A configuration with model tag 0.
    pub fn new(shape: KvShape, block_tokens: usize, budget_bytes: u64, backing: Backing) -> Self {
        Self {
            shape,
            block_tokens,
            budget_bytes,
            backing,
            model_tag: 0,
            dtype: KvDtype::F32,
        }
    }

    /// The same configuration with K/V stored as `dtype`.
    pub fn with_dtype(mut self, dtype: KvDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The same configuration for K/V computed by the weights identified by `tag`.
    pub fn with_model_tag(mut self, tag: u64) -> Self {
        self.model_tag = tag;
        self
    }

    /// Bytes of K/V data in one block: `n_layers × 2 × block_tokens × n_kv_heads × head_dim
    /// × (4 or 2)`.
    pub fn bytes_per_block(&self) -> Result<usize, KvError> {
        let s = self.shape;
        if s.n_layers == 0 || s.n_kv_heads == 0 || s.head_dim == 0 || self.block_tokens == 0 {
            return Err(KvError::Config(format!(
                "every dimension must be positive: {s:?}, block_tokens {}",
                self.block_tokens
            )));
        }
        if self.block_tokens > u32::MAX as usize {
            return Err(KvError::Config(format!(
                "block_tokens {} beyond u32",
                self.block_tokens
            )));
        }
        Geometry::bytes_per_block(s, self.block_tokens, self.dtype)
            .ok_or_else(|| KvError::Config(format!("block size of {s:?} overflows")))
    }

    fn geometry(&self) -> Result<Geometry, KvError> {
        let per_block = self.bytes_per_block()?;
        let blocks = self.budget_bytes / per_block as u64;
        if blocks < 1 {
            return Err(KvError::Config(format!(
                "budget of {} bytes holds no block of {per_block} bytes ({:?}, {} positions)",
                self.budget_bytes, self.shape, self.block_tokens
            )));
        }
        // Block ids are u32 in the records; a larger budget is capped, not refused.
        let n_blocks =
            usize::try_from(blocks.min(u64::from(u32::MAX))).unwrap_or(u32::MAX as usize);
        let geometry = Geometry {
            shape: self.shape,
            block_tokens: self.block_tokens,
            n_blocks,
            model_tag: self.model_tag,
            dtype: self.dtype,
        };
        geometry.total_len().ok_or_else(|| {
            KvError::Config(format!("{n_blocks} blocks overflow the address space"))
        })?;
        Ok(geometry)
    }
}

/// Occupancy of a pool. `free + used == total` always.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks an allocation can take, including the `restorable` ones.
    pub free: usize,
    /// Blocks in a live sequence's table or held through [`BlockPool::allocate`].
    pub used: usize,
    /// Free blocks that still hold a gone sequence's sealed K/V ([`SharedPool::restore`]
    /// can take them back). Allocation takes them last, oldest sequence's tail first.
    pub restorable: usize,
    /// Positions per block.
    pub block_tokens: usize,
    /// Bytes of K/V data per block.
    pub bytes_per_block: usize,
}

/// How a pool came to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolOrigin {
    /// Anonymous memory.
    Memory,
    /// A new file.
    Created,
    /// An existing file of the same geometry and model tag; its sealed blocks are restorable.
    Reopened,
    /// An existing file that could not be reused (damaged, or another geometry or model):
    /// it was started over, empty.
    Reset {
        /// Why the old contents were not reused.
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    /// Free, but still holding sealed blocks of this gone sequence.
    Orphan(u64),
    /// Taken by [`BlockPool::allocate`].
    Held,
    /// In the table of this live sequence.
    Seq(u64),
}

/// Restorable blocks of one gone sequence.
#[derive(Debug)]
struct Orphans {
    /// When the sequence went (pool-local clock): older sequences are evicted first.
    since: u64,
    /// `(index in the sequence, block)`, sorted by index.
    blocks: Vec<(u32, BlockId)>,
}

/// What [`BlockPool::restore_blocks`] found: the verified prefix of a sequence.
pub(crate) struct RestoredBlocks {
    pub table: Vec<BlockId>,
    pub valid_len: usize,
    pub chain: Vec<u64>,
    pub tail_crc: u32,
    pub dropped: usize,
}

/// Files mapped by a live pool of this process. Two pools over one file would scribble
/// over each other's blocks (and recreating a file under a live map faults), so the
/// second open is refused.
static OPEN_FILES: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Membership of a path in [`OPEN_FILES`], for as long as the pool lives.
#[derive(Debug)]
struct FileClaim(PathBuf);

impl FileClaim {
    fn take(path: &Path) -> Result<Self, KvError> {
        let key = canonical(path);
        let mut open = OPEN_FILES.lock().unwrap_or_else(PoisonError::into_inner);
        if !open.insert(key.clone()) {
            return Err(KvError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    "already mapped by another KV pool of this process",
                ),
            });
        }
        Ok(Self(key))
    }
}

impl Drop for FileClaim {
    fn drop(&mut self) {
        OPEN_FILES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// The path with its directory resolved (the file itself may not exist yet).
fn canonical(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (dir.canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// Maps the whole pool file read-write.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<MmapMut> {
    // SAFETY: a mapping is sound only while nothing else truncates or rewrites the file
    // behind it. The file is private to the state directory, which one llmos process owns;
    // inside the process OPEN_FILES keeps a second pool off it. Callers check the file's
    // length against its superblock before mapping, so every offset the pool computes lies
    // inside the map. What the bytes *say* is never trusted: records and data carry crcs.
    unsafe { MmapMut::map_mut(file) }
}

/// A fixed set of fixed-size K/V blocks, a free list and per-block records. A sequence
/// holds a table of block ids, never tensors (see [`crate::PagedKv`]).
pub struct BlockPool {
    geometry: Geometry,
    bytes_per_block: usize,
    data_off: usize,
    map: MmapMut,
    _claim: Option<FileClaim>,
    path: Option<PathBuf>,
    origin: PoolOrigin,
    slots: Vec<Slot>,
    /// Plain free blocks (records cleared); popped from the end.
    free: Vec<BlockId>,
    orphans: BTreeMap<u64, Orphans>,
    orphan_blocks: usize,
    clock: u64,
    live: HashSet<u64>,
}

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockPool")
            .field("geometry", &self.geometry)
            .field("path", &self.path)
            .field("origin", &self.origin)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl BlockPool {
    /// A pool as configured. With [`Backing::File`], an existing file of the same geometry
    /// and model tag is reopened (its sealed blocks become restorable); a missing one is
    /// created; one that cannot be reused — truncated, garbage, another shape, budget or
    /// model — is started over empty and the reason kept in [`BlockPool::origin`]: the pool
    /// is a cache of what the journal can recompute, so a bad file costs time, not data.
    pub fn new(config: PoolConfig) -> Result<Self, KvError> {
        let geometry = config.geometry()?;
        let path = match &config.backing {
            Backing::Memory => {
                let len = geometry
                    .total_len()
                    .ok_or_else(|| KvError::Config("pool size overflows".into()))?;
                let map = MmapMut::map_anon(len).map_err(|source| KvError::Io {
                    path: PathBuf::from("<anonymous memory>"),
                    source,
                })?;
                let mut pool = Self::from_map(geometry, map, None, None, PoolOrigin::Memory)?;
                pool.map[..SUPER_USED].copy_from_slice(&geometry.encode());
                return Ok(pool);
            }
            Backing::File(path) => path,
        };
        let claim = FileClaim::take(path)?;
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::create(path, geometry, claim, PoolOrigin::Created)
            }
            Err(source) => Err(KvError::Io {
                path: path.clone(),
                source,
            }),
            Ok(_) => match Self::open_file(path, None) {
                Ok(mut pool) if pool.geometry == geometry => {
                    pool._claim = Some(claim);
                    Ok(pool)
                }
                Ok(pool) => {
                    let reason = format!(
                        "file holds {} blocks of {:?} × {} positions of {:?} for model {:#x}, \
                         configured {} blocks of {:?} × {} of {:?} for model {:#x}",
                        pool.geometry.n_blocks,
                        pool.geometry.shape,
                        pool.geometry.block_tokens,
                        pool.geometry.dtype,
                        pool.geometry.model_tag,
                        geometry.n_blocks,
                        geometry.shape,
                        geometry.block_tokens,
                        geometry.dtype,
                        geometry.model_tag
                    );
                    drop(pool);
                    Self::reset(path, geometry, claim, reason)
                }
                Err(KvError::Corrupt { reason, .. }) => Self::reset(path, geometry, claim, reason),
                Err(e) => Err(e),
            },
        }
    }

    /// Reopens an existing pool file as it is, its geometry read from the file. A
    /// missing, truncated or damaged file is an error ([`KvError::Corrupt`] says what is
    /// wrong), never a panic; the file is not modified then.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self, KvError> {
        let path = path.as_ref();
        let claim = FileClaim::take(path)?;
        Self::open_file(path, Some(claim))
    }

    fn reset(
        path: &Path,
        geometry: Geometry,
        claim: FileClaim,
        reason: String,
    ) -> Result<Self, KvError> {
        tracing::warn!(
            target: "llmos::kv",
            path = %path.display(),
            %reason,
            "KV pool file not reusable; starting it over empty"
        );
        Self::create(path, geometry, claim, PoolOrigin::Reset { reason })
    }

    fn create(
        path: &Path,
        geometry: Geometry,
        claim: FileClaim,
        origin: PoolOrigin,
    ) -> Result<Self, KvError> {
        let io = |source| KvError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = geometry
            .total_len()
            .ok_or_else(|| KvError::Config("pool size overflows".into()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        // Truncating to zero first makes every record zero (free) whatever was there.
        file.set_len(len as u64).map_err(io)?;
        let map = map_file(&file).map_err(io)?;
        let mut pool = Self::from_map(geometry, map, Some(path), Some(claim), origin)?;
        // The superblock goes in last and is flushed: a crash while creating leaves a file
        // without one, which the next start treats as not reusable.
        pool.map[..SUPER_USED].copy_from_slice(&geometry.encode());
        pool.map.flush_range(0, SUPER_BYTES).map_err(io)?;
        Ok(pool)
    }

    fn open_file(path: &Path, claim: Option<FileClaim>) -> Result<Self, KvError> {
        let io = |source| KvError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| KvError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < SUPER_BYTES as u64 {
            return Err(corrupt(format!(
                "{len} bytes: truncated inside the superblock ({SUPER_BYTES} bytes)"
            )));
        }
        let mut head = [0u8; SUPER_USED];
        file.read_exact(&mut head).map_err(io)?;
        let geometry = Geometry::decode(&head).map_err(corrupt)?;
        let want = geometry.total_len().map(|l| l as u64);
        if want != Some(len) {
            return Err(corrupt(format!(
                "{len} bytes, but its superblock describes {} blocks in {} bytes \
                 (truncated or extended)",
                geometry.n_blocks,
                want.unwrap_or(u64::MAX)
            )));
        }
        let map = map_file(&file).map_err(io)?;
        let mut pool = Self::from_map(geometry, map, Some(path), claim, PoolOrigin::Reopened)?;
        pool.scan();
        Ok(pool)
    }

    fn from_map(
        geometry: Geometry,
        map: MmapMut,
        path: Option<&Path>,
        claim: Option<FileClaim>,
        origin: PoolOrigin,
    ) -> Result<Self, KvError> {
        let too_big = || KvError::Config("pool size overflows".into());
        let bytes_per_block =
            Geometry::bytes_per_block(geometry.shape, geometry.block_tokens, geometry.dtype)
                .ok_or_else(too_big)?;
        let data_off = geometry.data_off().ok_or_else(too_big)?;
        if Some(map.len()) != geometry.total_len() {
            return Err(KvError::Config(format!(
                "mapping of {} bytes does not match the pool's size",
                map.len()
            )));
        }
        let n = geometry.n_blocks;
        Ok(Self {
            geometry,
            bytes_per_block,
            data_off,
            map,
            _claim: claim,
            path: path.map(Path::to_path_buf),
            origin,
            slots: vec![Slot::Free; n],
            free: (0..n as u32).rev().map(BlockId).collect(),
            orphans: BTreeMap::new(),
            orphan_blocks: 0,
            clock: 0,
            live: HashSet::new(),
        })
    }

    /// Sorts a reopened file's blocks into restorable (a record that verifies) and free.
    fn scan(&mut self) {
        let mut free = Vec::new();
        for b in (0..self.geometry.n_blocks as u32).rev().map(BlockId) {
            match self.read_meta(b) {
                Some(meta) => {
                    self.slots[b.index()] = Slot::Orphan(meta.seq_id);
                    self.orphans
                        .entry(meta.seq_id)
                        .or_insert_with(|| Orphans {
                            since: 0,
                            blocks: Vec::new(),
                        })
                        .blocks
                        .push((meta.index, b));
                    self.orphan_blocks += 1;
                }
                None => free.push(b),
            }
        }
        for o in self.orphans.values_mut() {
            o.blocks.sort_unstable();
        }
        self.free = free;
        tracing::debug!(
            target: "llmos::kv",
            restorable = self.orphan_blocks,
            sequences = self.orphans.len(),
            "KV pool file reopened"
        );
    }

    /// Shape of the sequences this pool holds.
    pub fn shape(&self) -> KvShape {
        self.geometry.shape
    }

    /// Positions per block.
    pub fn block_tokens(&self) -> usize {
        self.geometry.block_tokens
    }

    /// The model tag the pool's K/V belong to.
    pub fn model_tag(&self) -> u64 {
        self.geometry.model_tag
    }

    /// The backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// How the pool came to be (created, reopened, started over and why).
    pub fn origin(&self) -> &PoolOrigin {
        &self.origin
    }

    /// Occupancy.
    pub fn stats(&self) -> PoolStats {
        let total = self.geometry.n_blocks;
        let free = self.free.len() + self.orphan_blocks;
        PoolStats {
            total,
            free,
            used: total - free,
            restorable: self.orphan_blocks,
            block_tokens: self.geometry.block_tokens,
            bytes_per_block: self.bytes_per_block,
        }
    }

    /// Takes `n` blocks for the caller to manage (give them back with
    /// [`BlockPool::free`]): all of them, or none and [`KvError::OutOfBlocks`].
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, KvError> {
        self.take(n, Slot::Held)
    }

    /// Gives back blocks from [`BlockPool::allocate`]. A block that is not held that way
    /// (already free, listed twice, in a sequence's table) is refused with
    /// [`KvError::NotHeld`] and nothing is freed.
    pub fn free(&mut self, blocks: &[BlockId]) -> Result<(), KvError> {
        let mut seen = HashSet::with_capacity(blocks.len());
        for &b in blocks {
            if self.slots.get(b.index()) != Some(&Slot::Held) || !seen.insert(b) {
                return Err(KvError::NotHeld(b.0));
            }
        }
        for &b in blocks {
            self.put_free(b);
        }
        Ok(())
    }

    /// Writes dirty pages of a file pool to disk. Not needed to survive a process crash
    /// (the page cache keeps a dead process's writes); it bounds what an OS crash or power
    /// loss can take. Blocks torn by one fail their checks on restore.
    pub fn flush(&self) -> Result<(), KvError> {
        match &self.path {
            Some(path) => self.map.flush().map_err(|source| KvError::Io {
                path: path.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Ids of gone sequences with restorable blocks (after a reopen: every sequence the
    /// file had sealed blocks for).
    pub fn restorable_sequences(&self) -> Vec<u64> {
        self.orphans.keys().copied().collect()
    }

    /// Forgets a gone sequence's restorable blocks (it finished, or the journal does not
    /// know it); returns how many blocks that freed.
    pub fn forget(&mut self, seq_id: u64) -> usize {
        let Some(o) = self.orphans.remove(&seq_id) else {
            return 0;
        };
        self.orphan_blocks -= o.blocks.len();
        for &(_, b) in &o.blocks {
            self.put_free(b);
        }
        o.blocks.len()
    }

    /// Forgets every gone sequence's blocks (once startup has restored what it wanted);
    /// returns how many blocks that freed.
    pub fn forget_all(&mut self) -> usize {
        let seqs = self.restorable_sequences();
        seqs.into_iter().map(|s| self.forget(s)).sum()
    }

    // ---- crate-internal: used by sequence views ----

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Registers a new live sequence; its restorable blocks, if any, are dropped because
    /// the new sequence will seal blocks under the same id and indices.
    pub(crate) fn open_sequence(&mut self, seq_id: u64) -> Result<(), KvError> {
        if self.live.contains(&seq_id) {
            return Err(KvError::SequenceInUse(seq_id));
        }
        self.forget(seq_id);
        self.live.insert(seq_id);
        Ok(())
    }

    pub(crate) fn take_for(&mut self, seq_id: u64, n: usize) -> Result<Vec<BlockId>, KvError> {
        self.take(n, Slot::Seq(seq_id))
    }

    /// Gives back a sequence's table when the sequence ends. The first `sealed` blocks
    /// stay restorable (a sequence dropped by a panicking engine can be taken back); the
    /// others become plain free blocks.
    pub(crate) fn retire(&mut self, seq_id: u64, table: &[BlockId], sealed: usize) {
        let sealed = sealed.min(table.len());
        for &b in &table[sealed..] {
            self.put_free(b);
        }
        if sealed > 0 {
            self.clock += 1;
            let mut blocks = Vec::with_capacity(sealed);
            for (i, &b) in table[..sealed].iter().enumerate() {
                self.slots[b.index()] = Slot::Orphan(seq_id);
                blocks.push((i as u32, b));
            }
            self.orphan_blocks += sealed;
            self.orphans.insert(
                seq_id,
                Orphans {
                    since: self.clock,
                    blocks,
                },
            );
        }
        self.live.remove(&seq_id);
    }

    /// Gives back blocks a live sequence no longer needs.
    pub(crate) fn put_back(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            self.put_free(b);
        }
    }

    /// Walks `seq_id`'s restorable blocks in order and keeps the longest prefix whose
    /// records, token hashes (against `tokens`) and K/V checksums all verify; the rest go
    /// to the free list. Registers the sequence as live.
    pub(crate) fn restore_blocks(
        &mut self,
        seq_id: u64,
        tokens: &[u32],
    ) -> Result<RestoredBlocks, KvError> {
        if self.live.contains(&seq_id) {
            return Err(KvError::SequenceInUse(seq_id));
        }
        let candidates = match self.orphans.remove(&seq_id) {
            Some(o) => o.blocks,
            None => Vec::new(),
        };
        self.orphan_blocks -= candidates.len();
        let bt = self.geometry.block_tokens;
        let mut table = Vec::new();
        let mut chain = Vec::new();
        let mut hash = layout::CHAIN_SEED;
        let mut valid_len = 0;
        let mut tail_crc = 0;
        let mut next = 0;
        loop {
            let index = table.len();
            // Exactly one block may claim each index; two (a record forged or copied by
            // damage) make the index ambiguous, so the prefix ends before it.
            let group = candidates[next..]
                .iter()
                .take_while(|(i, _)| *i as usize == index)
                .count();
            if group != 1 {
                break;
            }
            let block = candidates[next].1;
            next += 1;
            // The record is read again: the file is mapped, so what `scan` saw is not
            // necessarily what is there now.
            let Some(meta) = self.read_meta(block) else {
                break;
            };
            let filled = meta.filled as usize;
            let end = index * bt + filled;
            if meta.seq_id != seq_id || meta.index as usize != index || end > tokens.len() {
                break;
            }
            for &t in &tokens[chain.len()..end] {
                hash = layout::chain(hash, t);
                chain.push(hash);
            }
            if chain[end - 1] != meta.token_hash {
                break;
            }
            let crc = layout::crc_positions(
                0,
                self.block_data(block),
                self.geometry.shape,
                bt,
                0,
                filled,
                self.geometry.dtype.bytes(),
            );
            if crc != meta.data_crc {
                break;
            }
            table.push(block);
            valid_len = end;
            tail_crc = crc;
            if filled < bt {
                break;
            }
        }
        chain.truncate(valid_len);
        let mut dropped = 0;
        for &(_, b) in &candidates {
            if table.contains(&b) {
                self.slots[b.index()] = Slot::Seq(seq_id);
            } else {
                self.put_free(b);
                dropped += 1;
            }
        }
        self.live.insert(seq_id);
        Ok(RestoredBlocks {
            table,
            valid_len,
            chain,
            tail_crc,
            dropped,
        })
    }

    pub(crate) fn block_data(&self, b: BlockId) -> &[u8] {
        let at = self.data_off + b.index() * self.bytes_per_block;
        &self.map[at..at + self.bytes_per_block]
    }

    pub(crate) fn block_data_mut(&mut self, b: BlockId) -> &mut [u8] {
        let at = self.data_off + b.index() * self.bytes_per_block;
        &mut self.map[at..at + self.bytes_per_block]
    }

    pub(crate) fn read_meta(&self, b: BlockId) -> Option<BlockMeta> {
        BlockMeta::decode(&self.map[meta_range(b)], b.0, self.geometry.block_tokens)
    }

    /// Seals a block. The fence keeps the K/V stores the record vouches for ahead of the
    /// record itself, so a process killed in between leaves the old record, still true.
    pub(crate) fn write_meta(&mut self, b: BlockId, meta: &BlockMeta) {
        fence(Ordering::SeqCst);
        self.map[meta_range(b)].copy_from_slice(&meta.encode(b.0));
    }

    /// Unseals a block. The fence keeps the record's erasure ahead of whatever overwrites
    /// the K/V it vouched for.
    pub(crate) fn clear_meta(&mut self, b: BlockId) {
        self.map[meta_range(b)].fill(0);
        fence(Ordering::SeqCst);
    }

    fn take(&mut self, n: usize, slot: Slot) -> Result<Vec<BlockId>, KvError> {
        let available = self.free.len() + self.orphan_blocks;
        if n > available {
            return Err(KvError::OutOfBlocks {
                needed: n,
                free: available,
                total: self.geometry.n_blocks,
            });
        }
        while self.free.len() < n {
            self.evict_one();
        }
        let mut out = self.free.split_off(self.free.len() - n);
        out.reverse();
        for &b in &out {
            self.clear_meta(b);
            self.slots[b.index()] = slot;
        }
        Ok(out)
    }

    /// Frees the last block of the longest-gone sequence: its prefix stays restorable.
    fn evict_one(&mut self) {
        let Some((&seq, _)) = self.orphans.iter().min_by_key(|(_, o)| o.since) else {
            return;
        };
        let Some(o) = self.orphans.get_mut(&seq) else {
            return;
        };
        let popped = o.blocks.pop();
        if o.blocks.is_empty() {
            self.orphans.remove(&seq);
        }
        if let Some((_, b)) = popped {
            self.orphan_blocks -= 1;
            self.put_free(b);
        }
    }

    fn put_free(&mut self, b: BlockId) {
        self.clear_meta(b);
        self.slots[b.index()] = Slot::Free;
        self.free.push(b);
    }

    /// Checks the bookkeeping: every block is in exactly one place. For tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let n = self.geometry.n_blocks;
        let mut seen = vec![false; n];
        for &b in &self.free {
            if std::mem::replace(&mut seen[b.index()], true) {
                return Err(format!("{b} twice in the free list"));
            }
            if self.slots[b.index()] != Slot::Free {
                return Err(format!(
                    "{b} in the free list as {:?}",
                    self.slots[b.index()]
                ));
            }
        }
        let mut orphans = 0;
        for (seq, o) in &self.orphans {
            if o.blocks.is_empty() {
                return Err(format!("empty orphan entry for {seq}"));
            }
            for &(_, b) in &o.blocks {
                orphans += 1;
                if std::mem::replace(&mut seen[b.index()], true) {
                    return Err(format!("{b} both free and restorable"));
                }
                if self.slots[b.index()] != Slot::Orphan(*seq) {
                    return Err(format!("{b} restorable as {:?}", self.slots[b.index()]));
                }
            }
        }
        if orphans != self.orphan_blocks {
            return Err(format!("{orphans} orphans counted {}", self.orphan_blocks));
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let in_lists = seen[i];
            let free_like = matches!(slot, Slot::Free | Slot::Orphan(_));
            if in_lists != free_like {
                return Err(format!("block {i} is {slot:?} but listed: {in_lists}"));
            }
            if let Slot::Seq(s) = slot {
                if !self.live.contains(s) {
                    return Err(format!("block {i} held by dead sequence {s}"));
                }
            }
        }
        let stats = self.stats();
        if stats.free + stats.used != stats.total {
            return Err(format!("{stats:?} does not add up"));
        }
        Ok(())
    }

    /// Which live sequence holds block `b`, if any. For tests.
    #[cfg(test)]
    pub(crate) fn holder(&self, b: BlockId) -> Option<u64> {
        match self.slots[b.index()] {
            Slot::Seq(s) => Some(s),
            _ => None,
        }
    }
}

fn meta_range(b: BlockId) -> Range<usize> {
    let at = SUPER_BYTES + b.index() * META_BYTES;
    at..at + META_BYTES
}

/// A pool shared by its sequences and by whoever reads its statistics. Writers (a
/// scatter, an allocation, a record update) hold the lock exclusively and briefly;
/// readers (attention reading K/V in place) share it, so several sequences of one step
/// attend at once.
#[derive(Clone, Debug)]
pub struct SharedPool(Arc<RwLock<BlockPool>>);

impl SharedPool {
    /// Shares `pool`.
    pub fn new(pool: BlockPool) -> Self {
        Self(Arc::new(RwLock::new(pool)))
    }

    /// The pool itself, locked for writing. A panic while it was locked does not make it
    /// unusable: every update leaves the free list consistent before it can fail, and the
    /// records guard the contents.
    pub fn lock(&self) -> RwLockWriteGuard<'_, BlockPool> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pool, shared with other readers.
    pub fn read(&self) -> RwLockReadGuard<'_, BlockPool> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Occupancy (takes the lock briefly).
    pub fn stats(&self) -> PoolStats {
        self.read().stats()
    }
}
