//! The `models` actor: owns the loaded model. Weights are memory-mapped once and shared
//! read-only; a restart of anything below `models` never reloads them, and a restart of
//! `models` itself keeps the already loaded instance.

use std::sync::Arc;

use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::config::RuntimeConfig;
use crate::error::InferenceError;
use crate::services::{LoadedModel, Services};

/// Messages of the models actor.
pub enum ModelsMsg {
    /// Name, context length and vocabulary size of the loaded model.
    Info(RpcReplyPort<(String, usize, usize)>),
}

/// The models actor.
pub struct ModelsActor {
    /// Shared services.
    pub services: Arc<Services>,
}

/// Loads the configured model (GGUF file or Hugging Face directory) for the CPU, telling
/// the configured progress hook, if any, after each tensor.
pub fn load_model(config: &RuntimeConfig) -> Result<LoadedModel, InferenceError> {
    let started = std::time::Instant::now();
    let device = candle_core::Device::Cpu;
    let loaded = match &config.load_progress {
        Some(hook) => llmos_models::load_with_progress(&config.model, &device, &*hook.0)?,
        None => llmos_models::load(&config.model, &device)?,
    };
    let name = config
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| config.model.display().to_string());
    let fingerprint = llmos_models::fingerprint(&config.model)?;
    tracing::info!(model = %name, fingerprint = format_args!("{fingerprint:016x}"), elapsed = ?started.elapsed(), "model loaded");
    Ok(LoadedModel {
        context: loaded.model.config().max_seq_len,
        eos: loaded.tokenizer.eos_id(),
        model: loaded.model,
        tokenizer: loaded.tokenizer,
        name,
        fingerprint,
        chat_template: loaded.chat_template,
    })
}

impl Actor for ModelsActor {
    type Msg = ModelsMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<ModelsMsg>,
        _args: (),
    ) -> Result<(), ActorProcessingErr> {
        if !self.services.has_model() {
            let model = load_model(&self.services.config)?;
            self.services.set_model(Arc::new(model));
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<ModelsMsg>,
        message: ModelsMsg,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ModelsMsg::Info(reply) => {
                let model = self.services.model()?;
                let _ = reply.send((
                    model.name.clone(),
                    model.context,
                    model.tokenizer.vocab_size(),
                ));
            }
        }
        Ok(())
    }
}
