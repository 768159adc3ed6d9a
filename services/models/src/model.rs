//! Our Llama-family forward pass: one batched step over several sequences, each with its
//! own KV store reached only through the [`KvStore`] trait, on plain f32 rows — our own
//! matmul and attention kernels and the per-row steps of [`crate::elementwise`], no tensor
//! op per layer.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use llmos_kv::{KvShape, KvStore};
use rayon::prelude::*;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::elementwise::{add_assign, rms_norm, silu_mul, Rotary};
use crate::error::{ModelError, Result};
use crate::progress::LoadProgress;
use crate::tokenizer::Tokenizer;
use crate::weights::{sized, Layer, Weights};

/// One sequence's part of a batched forward step.
pub struct SeqStep<'a> {
    /// The new tokens (at least one): a prompt chunk, or the last sampled token.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; `kv` must hold positions `0..start_pos` already.
    pub start_pos: usize,
    /// This sequence's keys and values; positions `start_pos..start_pos + tokens.len()`
    /// are written and committed by the step.
    pub kv: &'a mut dyn KvStore,
}

impl std::fmt::Debug for SeqStep<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqStep")
            .field("tokens", &self.tokens.len())
            .field("start_pos", &self.start_pos)
            .field("kv_len", &self.kv.len())
            .finish()
    }
}

/// A loaded model: read-only weights on one device. Share it with `Arc`; `forward` takes
/// `&self`, all per-sequence state lives in the callers' KV stores.
pub struct Model {
    config: ModelConfig,
    weights: Weights,
    device: Device,
    rotary: Rotary,
    /// Buffers of finished steps, lent to the next ones (one per step in flight).
    buffers: Mutex<Vec<StepBuffers>>,
}

/// The buffers of one forward step: every intermediate of the layers is written into
/// them, so a step allocates nothing per op once earlier steps have sized them.
#[derive(Default)]
struct StepBuffers {
    /// The residual stream `[T, dim]`.
    x: Vec<f32>,
    /// The normed input of a block `[T, dim]`.
    normed: Vec<f32>,
    /// A fused projection's output before its columns are split.
    fused: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output `[T, H·hd]`.
    attention: Vec<f32>,
    /// Output of `wo` or `down` `[T, dim]`.
    projected: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    positions: Vec<usize>,
    plans: Vec<SeqPlan>,
    /// Final-norm input and output of the rows that want logits.
    last: Vec<f32>,
    last_normed: Vec<f32>,
    logits: Vec<f32>,
}

/// Buffers kept by the model at most (steps in flight at once beyond this allocate).
const KEPT_STEP_BUFFERS: usize = 8;

/// A step's buffers larger than this are freed after it rather than kept: one long
/// prompt's chunk should not pin its memory for every later decode step.
const KEPT_BYTES: usize = 256 << 20;

impl StepBuffers {
    /// Bytes the buffers hold (capacity).
    fn bytes(&self) -> usize {
        let floats = [
            &self.x,
            &self.normed,
            &self.fused,
            &self.q,
            &self.k,
            &self.v,
            &self.attention,
            &self.projected,
            &self.gate,
            &self.up,
            &self.last,
            &self.last_normed,
            &self.logits,
        ];
        floats.iter().map(|v| v.capacity() * 4).sum::<usize>()
            + self.positions.capacity() * std::mem::size_of::<usize>()
            + self.plans.capacity() * std::mem::size_of::<SeqPlan>()
    }
}

/// Projection multiply-adds of a step from which it is worth handing to the compute pool
/// ([`Model::step_wants_pool`]): about a tenth of a millisecond of one core's work, where
/// a hand-off to a sleeping worker thread and back costs tens of microseconds.
const POOL_STEP_WORK: usize = 1 << 20;

/// Attention work (query rows × keys × width, summed over sequences) from which a step's
/// sequences attend in parallel.
const PARALLEL_ATTENTION_WORK: usize = 1 << 16;

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// A model and its tokenizer as loaded from one source.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The weights and forward.
    pub model: Arc<Model>,
    /// The matching tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's own chat template (GGUF `tokenizer.chat_template`, Hugging Face
    /// `chat_template`), compiled, with the model's BOS/EOS strings; `None` when the model
    /// has none, or one that does not compile (logged as a warning).
    pub chat_template: Option<ChatTemplate>,
}

/// What a format's loader hands to [`assemble`].
pub(crate) struct Parts {
    pub(crate) config: ModelConfig,
    pub(crate) weights: Weights,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) chat_template: Option<ChatTemplate>,
}

/// No progress reports.
fn quiet(_: LoadProgress) {}

/// Loads a GGUF file (llama architecture) and the tokenizer in its metadata.
pub fn load_gguf(path: impl AsRef<Path>, device: &Device) -> Result<LoadedModel> {
    gguf_with_progress(path.as_ref(), device, &quiet)
}

/// Loads a Hugging Face Llama-family directory (config.json, *.safetensors, tokenizer.json,
/// and tokenizer_config.json for the chat template when present).
pub fn load_hf_dir(dir: impl AsRef<Path>, device: &Device) -> Result<LoadedModel> {
    hf_with_progress(dir.as_ref(), device, &quiet)
}

/// Loads a directory as a Hugging Face checkpoint and anything else as GGUF.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<LoadedModel> {
    load_with_progress(path, device, &quiet)
}

/// [`load`], calling `progress` once before the first tensor is read and after each
/// weight tensor (GGUF or Hugging Face), on the loading thread. Counts only grow; a load
/// that succeeds reports 100% last (`LoadProgress::is_complete`). A load that fails stops
/// reporting where it failed.
pub fn load_with_progress(
    path: impl AsRef<Path>,
    device: &Device,
    progress: &dyn Fn(LoadProgress),
) -> Result<LoadedModel> {
    let path = path.as_ref();
    if path.is_dir() {
        hf_with_progress(path, device, progress)
    } else {
        gguf_with_progress(path, device, progress)
    }
}

fn gguf_with_progress(
    path: &Path,
    device: &Device,
    progress: &dyn Fn(LoadProgress),
) -> Result<LoadedModel> {
    guarded(path, || crate::gguf::load(path, device, progress)).and_then(|l| assemble(l, device))
}

fn hf_with_progress(
    dir: &Path,
    device: &Device,
    progress: &dyn Fn(LoadProgress),
) -> Result<LoadedModel> {
    guarded(dir, || crate::hf::load(dir, device, progress)).and_then(|l| assemble(l, device))
}

/// Runs a loader so that a panic deep in a dependency on a malformed file is an error,
/// never a crash of the loading actor's thread.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(ModelError::corrupt(
            path,
            format!("loader panicked: {what}"),
        ))
    })
}

/// Compiles a chat template found in a model's metadata. One that does not compile is
/// logged and dropped (the model then gets the default chat prompt): a template is an
/// optional extra, and the model stays usable for completions.
pub(crate) fn compile_template(
    path: &Path,
    source: Option<String>,
    bos: &str,
    eos: &str,
) -> Option<ChatTemplate> {
    let source = source?;
    match ChatTemplate::new(source, bos, eos) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(
                target: "llmos::models",
                source = %path.display(),
                error = %e,
                "the model's chat template is unusable; chat requests get the default prompt"
            );
            None
        }
    }
}

fn assemble(parts: Parts, device: &Device) -> Result<LoadedModel> {
    let Parts {
        config,
        weights,
        tokenizer,
        chat_template,
    } = parts;
    let model = Model::new(config, weights, device)?;
    tracing::info!(
        target: "llmos::models",
        source = %tokenizer.source().display(),
        arch = %model.config.architecture,
        layers = model.config.n_layers,
        dim = model.config.dim,
        weights = %model.config.weight_type,
        chat_template = if chat_template.is_some() { "model" } else { "default" },
        "model loaded"
    );
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: Arc::new(tokenizer),
        chat_template,
    })
}

/// Per-forward data of one sequence.
struct SeqPlan {
    offset: usize,
    n: usize,
    start: usize,
}

/// What a forward step computes besides the KV, and how it reports progress
/// ([`Model::forward_with`]).
#[derive(Default)]
pub struct StepOptions<'a> {
    /// Which sequences of the batch need logits (`None`: all). A prefill chunk that does
    /// not end its prompt needs none, and skips the output projection.
    pub logits: Option<&'a [bool]>,
    /// Called before each layer with its index, from the calling thread: a heartbeat for
    /// long steps. Returning `false` abandons the step with [`ModelError::Aborted`]
    /// (nothing is committed).
    pub on_layer: Option<&'a mut dyn FnMut(usize) -> bool>,
}

impl Model {
    fn new(config: ModelConfig, weights: Weights, device: &Device) -> Result<Model> {
        let rotary = Rotary::new(
            config.head_dim,
            config.rope_theta,
            config.max_seq_len,
            config.rope_layout,
        );
        Ok(Model {
            rotary,
            config,
            weights,
            device: device.clone(),
            buffers: Mutex::new(Vec::new()),
        })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The KV shape each sequence's store must have.
    pub fn kv_shape(&self) -> KvShape {
        self.config.kv_shape()
    }

    /// Whether a step computing `rows` new tokens is worth running on the compute pool
    /// ([`crate::on_cpu_pool`]): large steps are, so that their kernels' parallel parts
    /// fork inside it; a tiny model's decode step costs less than the hand-off and runs
    /// on the calling thread (its kernels stay below their parallel thresholds).
    pub fn step_wants_pool(&self, rows: usize) -> bool {
        let c = &self.config;
        let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        // Projection multiply-adds per new token: what a step's cost scales with.
        let per_layer = c.dim * (2 * qd + 2 * kvd) + 3 * c.dim * c.ffn_dim;
        let per_row = c.n_layers * per_layer + c.dim * c.vocab_size;
        per_row.saturating_mul(rows) >= POOL_STEP_WORK
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One forward step over a batch of sequences. Returns, for each sequence, the f32
    /// logits `[vocab]` of its last new position. Each sequence's KV store gets its new
    /// positions written and committed; on error nothing is committed (positions past
    /// `kv.len()` may hold partial writes, which the next step overwrites).
    ///
    /// Batch-invariant: a sequence's logits and KV are bit-identical whatever else is in
    /// the batch and however its tokens were split into steps. All sequences' new tokens
    /// go through the embedding, norms, projections and feed-forward as one `[T, dim]`
    /// matrix whose rows never mix ([`crate::kernels`], `Linear`); only rotary positions
    /// and attention are per sequence, and attention sums in position order. On the CPU,
    /// call it inside [`crate::on_cpu_pool`] (see there).
    pub fn forward(&self, batch: &mut [SeqStep<'_>]) -> Result<Vec<Tensor>> {
        self.forward_with(batch, StepOptions::default())?
            .into_iter()
            .map(|logits| {
                let logits = logits.unwrap_or_default();
                let n = logits.len();
                Ok(Tensor::from_vec(logits, n, &self.device)?)
            })
            .collect()
    }

    /// [`Model::forward`] with options: logits only where asked (`None` elsewhere) and a
    /// callback before each layer.
    pub fn forward_with(
        &self,
        batch: &mut [SeqStep<'_>],
        options: StepOptions<'_>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let mut buffers = self
            .buffers
            .lock()
            .map(|mut kept| kept.pop())
            .unwrap_or_default()
            .unwrap_or_default();
        let result = self.step(batch, options, &mut buffers);
        if buffers.bytes() <= KEPT_BYTES {
            if let Ok(mut kept) = self.buffers.lock() {
                if kept.len() < KEPT_STEP_BUFFERS {
                    kept.push(buffers);
                }
            }
        }
        result
    }

    /// [`Model::forward_with`] in `b`'s buffers.
    fn step(
        &self,
        batch: &mut [SeqStep<'_>],
        mut options: StepOptions<'_>,
        b: &mut StepBuffers,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        self.plan(batch, &mut b.plans)?;
        if let Some(wanted) = options.logits {
            if wanted.len() != batch.len() {
                return Err(ModelError::InvalidInput(format!(
                    "logits wanted for {} sequences of {}",
                    wanted.len(),
                    batch.len()
                )));
            }
        }
        let total: usize = b.plans.iter().map(|p| p.n).sum();
        b.x.clear();
        for s in batch.iter() {
            for &t in s.tokens {
                let at = t as usize * c.dim;
                b.x.extend_from_slice(&self.weights.embed[at..at + c.dim]);
            }
        }
        b.positions.clear();
        b.positions
            .extend(b.plans.iter().flat_map(|p| p.start..p.start + p.n));
        for (s, p) in batch.iter_mut().zip(&b.plans) {
            s.kv.reserve(p.start + p.n)?;
        }
        for (l, layer) in self.weights.layers.iter().enumerate() {
            if let Some(on_layer) = options.on_layer.as_mut() {
                if !on_layer(l) {
                    return Err(ModelError::Aborted(l));
                }
            }
            rms_norm(&b.x, &layer.attn_norm, c.rms_eps, &mut b.normed);
            self.qkv(layer, b)?;
            self.attend(l, batch, b)?;
            layer
                .wo
                .forward_into(&b.attention, total, &self.device, &mut b.projected)?;
            add_assign(&mut b.x, &b.projected);
            rms_norm(&b.x, &layer.ffn_norm, c.rms_eps, &mut b.normed);
            self.ffn(layer, total, b)?;
            add_assign(&mut b.x, &b.projected);
        }
        for (s, p) in batch.iter_mut().zip(&b.plans) {
            s.kv.commit(p.start + p.n)?;
        }

        let mut out: Vec<Option<Vec<f32>>> = vec![None; b.plans.len()];
        let wanted = |i: usize| options.logits.is_none_or(|w| w[i]);
        b.last.clear();
        for (i, p) in b.plans.iter().enumerate().filter(|(i, _)| wanted(*i)) {
            let row = p.offset + p.n - 1;
            b.last
                .extend_from_slice(&b.x[row * c.dim..(row + 1) * c.dim]);
            out[i] = Some(Vec::new());
        }
        let rows = b.last.len() / c.dim;
        if rows == 0 {
            return Ok(out);
        }
        rms_norm(&b.last, &self.weights.norm, c.rms_eps, &mut b.last_normed);
        self.weights
            .lm_head
            .forward_into(&b.last_normed, rows, &self.device, &mut b.logits)?;
        let mut rows = b.logits.chunks_exact(c.vocab_size);
        for logits in out.iter_mut().flatten() {
            logits.extend_from_slice(rows.next().unwrap_or_default());
        }
        Ok(out)
    }

    /// Validates the batch and lays out where each sequence's rows are.
    fn plan(&self, batch: &[SeqStep<'_>], plans: &mut Vec<SeqPlan>) -> Result<()> {
        let c = &self.config;
        if batch.is_empty() {
            return Err(ModelError::InvalidInput("empty batch".into()));
        }
        let mut offset = 0;
        plans.clear();
        for (i, s) in batch.iter().enumerate() {
            let n = s.tokens.len();
            let bad = |what: String| Err(ModelError::InvalidInput(format!("sequence {i}: {what}")));
            if n == 0 {
                return bad("no tokens".into());
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return bad(format!(
                    "token id {t} outside vocabulary of {}",
                    c.vocab_size
                ));
            }
            if s.kv.shape() != c.kv_shape() {
                return bad(format!(
                    "KV store shape {:?}, model needs {:?}",
                    s.kv.shape(),
                    c.kv_shape()
                ));
            }
            if s.start_pos > s.kv.len() {
                return bad(format!(
                    "start position {} leaves a gap after {} cached positions",
                    s.start_pos,
                    s.kv.len()
                ));
            }
            if s.start_pos + n > c.max_seq_len {
                return bad(format!(
                    "positions up to {} exceed the context of {}",
                    s.start_pos + n,
                    c.max_seq_len
                ));
            }
            plans.push(SeqPlan {
                offset,
                n,
                start: s.start_pos,
            });
            offset += n;
        }
        Ok(())
    }

    /// Projections and rotary embedding of `b.normed` for all rows (row `r` at
    /// `b.positions[r]`): `b.q` `[T, H·hd]` (already scaled by 1/√hd), `b.k` and `b.v`
    /// `[T, Hkv·hd]`.
    fn qkv(&self, layer: &Layer, b: &mut StepBuffers) -> Result<()> {
        let c = &self.config;
        let t = b.positions.len();
        let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        layer.qkv.forward_into(
            &b.normed,
            t,
            &self.device,
            [qd, kvd, kvd],
            &mut b.fused,
            [&mut b.q, &mut b.k, &mut b.v],
        )?;
        let scale = (1.0 / (c.head_dim as f64).sqrt()) as f32;
        self.rotary.apply(&mut b.q, qd, &b.positions, Some(scale));
        self.rotary.apply(&mut b.k, kvd, &b.positions, None);
        Ok(())
    }

    /// Attention of every sequence: stores its new k/v rows, then attends over its whole
    /// cache in place ([`crate::kernels::attention`]) into `b.attention` `[T, H * hd]`.
    fn attend(&self, layer: usize, batch: &mut [SeqStep<'_>], b: &mut StepBuffers) -> Result<()> {
        let c = &self.config;
        let shape = crate::kernels::AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let plans = &b.plans;
        let total: usize = plans.iter().map(|p| p.n).sum();
        // New rows first (each store takes its pool's lock for writing in turn)…
        for (s, p) in batch.iter_mut().zip(plans) {
            let rows = p.offset * kvd..(p.offset + p.n) * kvd;
            s.kv.write_rows(layer, p.start, &b.k[rows.clone()], &b.v[rows])?;
        }
        // …then every sequence attends at once, reading its K/V in place.
        let q = &b.q;
        let out = sized(&mut b.attention, total * qd);
        let attend_one = |((s, p), o): ((&SeqStep<'_>, &SeqPlan), &mut [f32])| {
            let q = &q[p.offset * qd..(p.offset + p.n) * qd];
            s.kv.view(layer, p.start + p.n, &mut |view| {
                crate::kernels::attention(q, view, p.start, shape, o)
            })
        };
        // Sequences in parallel when there are several and enough work (one sequence's
        // own attention splits by rows inside the kernel).
        let work: usize = plans.iter().map(|p| p.n * (p.start + p.n) * qd).sum();
        if plans.len() > 1 && work >= PARALLEL_ATTENTION_WORK {
            let mut parts: Vec<&mut [f32]> = Vec::with_capacity(plans.len());
            let mut rest = out;
            for p in plans {
                let (part, tail) = rest.split_at_mut(p.n * qd);
                parts.push(part);
                rest = tail;
            }
            batch
                .par_iter()
                .zip(plans.par_iter())
                .zip(parts.into_par_iter())
                .map(attend_one)
                .collect::<std::result::Result<Vec<()>, llmos_kv::KvError>>()?;
        } else {
            let mut rest = out;
            for (s, p) in batch.iter().zip(plans) {
                let (part, tail) = rest.split_at_mut(p.n * qd);
                rest = tail;
                attend_one(((s, p), part))?;
            }
        }
        Ok(())
    }

    /// The feed-forward of all `rows` of `b.normed` into `b.projected`:
    /// `down(silu(gate(h)) · up(h))`.
    fn ffn(&self, layer: &Layer, rows: usize, b: &mut StepBuffers) -> Result<()> {
        let f = self.config.ffn_dim;
        layer.gate_up.forward_into(
            &b.normed,
            rows,
            &self.device,
            [f, f],
            &mut b.fused,
            [&mut b.gate, &mut b.up],
        )?;
        silu_mul(&mut b.gate, &b.up, f);
        layer
            .down
            .forward_into(&b.gate, rows, &self.device, &mut b.projected)
    }
}
