//! Errors of model loading, tokenization and the forward pass.

use std::path::PathBuf;

/// What went wrong with a model. Loading errors name the file and the problem, so an
/// operator can tell a missing shard from a torn download from an unsupported model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model needs does not exist.
    #[error("{path}: file not found")]
    MissingFile {
        /// The file.
        path: PathBuf,
    },
    /// A file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file ends before the data its header promises.
    #[error("{path}: truncated file: {detail}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What is missing.
        detail: String,
    },
    /// A header, metadata entry or configuration value is malformed or missing.
    #[error("{path}: corrupt or invalid header/metadata: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The model is not a Llama-family model this crate can run.
    #[error("{path}: unsupported architecture: {detail}")]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The architecture and why it is refused.
        detail: String,
    },
    /// A tensor is stored in a type this crate cannot compute with.
    #[error("{path}: tensor {tensor}: unsupported tensor type {dtype}")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor (or "?" when the file's header did not get that far).
        tensor: String,
        /// The type as the file names it.
        dtype: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{path}: missing tensor {tensor}")]
    MissingTensor {
        /// The file (or directory, for sharded checkpoints).
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor's shape disagrees with the model's configuration.
    #[error("{path}: tensor {tensor} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// The tokenizer could not be built or used.
    #[error("{path}: tokenizer: {detail}")]
    Tokenizer {
        /// The file the tokenizer came from.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A forward call was given inputs the model cannot take (empty step, token id
    /// outside the vocabulary, position past the context, KV shape of another model…).
    #[error("invalid forward input: {0}")]
    InvalidInput(String),
    /// The step's progress callback asked to stop (its engine was abandoned).
    #[error("forward step abandoned before layer {0}")]
    Aborted(usize),
    /// A chat template does not compile, raised an exception (`raise_exception`) or failed
    /// while rendering.
    #[error("chat template {0}")]
    ChatTemplate(String),
    /// KV memory refused a reserve, write or read.
    #[error(transparent)]
    Kv(#[from] llmos_kv::KvError),
    /// A tensor operation failed during the forward pass or a synthetic write.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile { path }
        } else {
            ModelError::Io { path, source }
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        ModelError::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
