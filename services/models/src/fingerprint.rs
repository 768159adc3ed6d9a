//! A model's identity by content: a stable 64-bit fingerprint of the bytes of its files
//! (weights with their types and shapes, configuration, tokenizer), independent of where
//! the files live or what they are called. The KV pool is tagged with it, so K/V computed
//! by other weights are never restored, and renaming or moving a model keeps its K/V.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Bytes per checksummed chunk: chunks are folded into the fingerprint in order.
const CHUNK: usize = 1 << 20;

/// FNV-1a over 64-bit words: a fixed, documented mix (stable across Rust releases, unlike
/// `DefaultHasher`), fed with lengths and CRC-32s rather than raw bytes.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn word(&mut self, w: u64) {
        for b in w.to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The fingerprint of the model at `path`: a GGUF file, or a Hugging Face directory (every
/// regular file in it, by name order; names count, their directory does not).
pub fn fingerprint(path: impl AsRef<Path>) -> Result<u64> {
    let path = path.as_ref();
    let mut fnv = Fnv::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| ModelError::io(path, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let name = file.file_name().map(|n| n.as_encoded_bytes().to_vec());
            fnv.word(u64::from(crc32fast::hash(&name.unwrap_or_default())));
            file_into(&file, &mut fnv)?;
        }
    } else {
        file_into(path, &mut fnv)?;
    }
    Ok(fnv.0)
}

fn file_into(path: &Path, fnv: &mut Fnv) -> Result<()> {
    let map = crate::mmap::map_file(path)?;
    fnv.word(map.len() as u64);
    for chunk in map.chunks(CHUNK) {
        fnv.word(u64::from(crc32fast::hash(chunk)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_same_fingerprint_wherever_they_are_and_one_byte_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 31 % 251) as u8).collect();
        let a = dir.path().join("model.gguf");
        let b = dir.path().join("renamed-copy.gguf");
        std::fs::write(&a, &bytes).unwrap();
        std::fs::write(&b, &bytes).unwrap();
        assert_eq!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
        let mut changed = bytes.clone();
        changed[2 * CHUNK + 5] ^= 1;
        std::fs::write(&b, &changed).unwrap();
        assert_ne!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
        let mut longer = bytes;
        longer.push(0);
        std::fs::write(&b, &longer).unwrap();
        assert_ne!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
        assert!(matches!(
            fingerprint(dir.path().join("missing")),
            Err(ModelError::MissingFile { .. })
        ));
    }
}
