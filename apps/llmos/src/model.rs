//! `llmos model …`: model tools. `synth` writes a random-weight Llama-family model of a
//! real shape (GGUF file or Hugging Face directory) for tests and benchmarks.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use llmos_models::synth::{self, Preset};
use llmos_models::GgmlDType;

/// Model subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a random-weight model of a real shape.
    Synth(SynthArgs),
}

/// Layout of a synthesised model.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Layout {
    /// One GGUF file (tokenizer in its metadata).
    Gguf,
    /// A Hugging Face directory: config.json, model.safetensors, tokenizer.json.
    Hf,
}

/// `llmos model synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Where to write (a file for GGUF, a directory for HF).
    #[arg(long)]
    out: PathBuf,
    /// Shape preset: `tiny` (tests), `tiny-k` (k-quant friendly), `small-100m` (~100M
    /// parameters, throughput work) or `bench-134m` (the side-by-side bench model of
    /// ../shared/ANCHORS.md).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// File layout.
    #[arg(long, value_enum, default_value = "gguf")]
    format: Layout,
    /// Weight type for GGUF: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What went wrong in a model subcommand.
#[derive(Debug, thiserror::Error)]
pub enum ModelCommandError {
    /// No preset of that name.
    #[error("unknown preset `{0}` (known: {1})")]
    UnknownPreset(String, String),
    /// No weight type of that name.
    #[error("unknown weight type `{0}` (known: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k)")]
    UnknownDtype(String),
    /// Writing the model failed.
    #[error(transparent)]
    Model(#[from] llmos_models::ModelError),
}

fn weight_type(name: &str) -> Result<GgmlDType, ModelCommandError> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q4k" | "q4_k" => GgmlDType::Q4K,
        "q6k" | "q6_k" => GgmlDType::Q6K,
        _ => return Err(ModelCommandError::UnknownDtype(name.to_string())),
    })
}

/// Runs a model subcommand.
pub fn run(command: ModelCommand) -> Result<(), ModelCommandError> {
    match command {
        ModelCommand::Synth(args) => {
            let preset = Preset::by_name(&args.preset).ok_or_else(|| {
                let known: Vec<&str> = Preset::ALL.iter().map(|p| p.name).collect();
                ModelCommandError::UnknownPreset(args.preset.clone(), known.join(", "))
            })?;
            match args.format {
                Layout::Gguf => {
                    synth::write_gguf(&args.out, &preset, weight_type(&args.dtype)?, args.seed)?
                }
                Layout::Hf => synth::write_hf_dir(&args.out, &preset, args.seed)?,
            }
            eprintln!(
                "wrote {} ({} parameters, preset {})",
                args.out.display(),
                preset.param_count(),
                preset.name
            );
            Ok(())
        }
    }
}
