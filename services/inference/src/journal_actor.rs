//! The `journal` actor: opens the write-ahead token log (recovering a torn tail), publishes
//! it to the tasks, compacts finished requests away, and closes it on shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmos_journal::{Journal, JournalOptions};
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::services::Services;

/// How often finished requests are compacted out of the log.
const COMPACT_EVERY: Duration = Duration::from_secs(30);

/// Messages of the journal actor.
#[derive(Debug)]
pub enum JournalMsg {
    /// Rewrite the log without finished requests (when it is worth it).
    Compact,
}

/// The journal actor.
pub struct JournalActor {
    /// Shared services.
    pub services: Arc<Services>,
}

/// The open journal of this instance.
pub struct JournalState {
    journal: Arc<Mutex<Journal>>,
}

impl Actor for JournalActor {
    type Msg = JournalMsg;
    type State = JournalState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<JournalMsg>,
        _args: (),
    ) -> Result<JournalState, ActorProcessingErr> {
        let options = JournalOptions {
            flush: self.services.config.flush,
            ..JournalOptions::default()
        };
        // A crashed predecessor left its handle behind (no post_stop on failure); one journal
        // per directory may be open, so release it before reopening.
        drop(self.services.take_journal());
        let (journal, recovered) = Journal::open(self.services.state_dir(), options)?;
        if recovered.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovered.truncated_bytes,
                "journal: cut a torn or corrupt tail"
            );
        }
        if let Some(max) = recovered.requests.keys().max() {
            self.services.bump_request_ids_past(*max);
        }
        let journal = Arc::new(Mutex::new(journal));
        self.services.set_journal(Some(journal.clone()));
        drop(myself.send_interval(COMPACT_EVERY, || JournalMsg::Compact));
        Ok(JournalState { journal })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<JournalMsg>,
        state: &mut JournalState,
    ) -> Result<(), ActorProcessingErr> {
        self.services.set_journal(None);
        let mut journal = state.journal.lock().unwrap_or_else(|e| e.into_inner());
        journal.flush()?;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<JournalMsg>,
        message: JournalMsg,
        state: &mut JournalState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            JournalMsg::Compact => {
                let mut journal = state.journal.lock().unwrap_or_else(|e| e.into_inner());
                let finished = journal
                    .requests()
                    .values()
                    .filter(|r| r.is_finished())
                    .count();
                if finished > 0 {
                    let stats = journal.compact()?;
                    tracing::info!(?stats, "journal compacted");
                }
            }
        }
        Ok(())
    }
}
