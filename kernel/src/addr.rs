//! Stable addresses: reach a child by path across its restarts, never losing a message
//! silently.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::concurrency::oneshot;
use ractor::{ActorCell, Message, MessagingErr, RpcReplyPort};
use tokio::sync::watch;

use crate::error::KernelError;
use crate::path::ActorPath;
use crate::registry::{NodeEntry, Slot};

/// How long a send waits for a restarting actor's next instance before giving the message
/// back, unless the address is given another limit.
pub const DEFAULT_RESOLVE_WAIT: Duration = Duration::from_secs(5);

/// A message that could not be delivered, handed back with the reason.
#[derive(Debug)]
pub struct Undelivered<M> {
    /// The message, untouched.
    pub message: M,
    /// Why it was not delivered.
    pub error: KernelError,
}

impl<M> std::fmt::Display for Undelivered<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "message not delivered: {}", self.error)
    }
}

impl<M: std::fmt::Debug> std::error::Error for Undelivered<M> {}

/// A typed, restart-proof address of the actor at a path.
///
/// A send resolves the current instance at that moment. While the actor is restarting,
/// the send waits (up to the resolve wait) for the new instance and delivers there; if none
/// comes, or the actor is stopped for good, the message is handed back in [`Undelivered`].
/// A call whose instance dies after accepting the message fails with
/// [`KernelError::DiedBeforeReply`]: the caller always learns the outcome.
pub struct Addr<M> {
    node: Arc<NodeEntry>,
    slot: watch::Receiver<Slot>,
    resolve_wait: Duration,
    _message: PhantomData<fn(M)>,
}

impl<M> Clone for Addr<M> {
    fn clone(&self) -> Self {
        Self {
            node: self.node.clone(),
            slot: self.slot.clone(),
            resolve_wait: self.resolve_wait,
            _message: PhantomData,
        }
    }
}

impl<M: Message> Addr<M> {
    pub(crate) fn new(node: Arc<NodeEntry>) -> Self {
        Self {
            slot: node.subscribe_slot(),
            node,
            resolve_wait: DEFAULT_RESOLVE_WAIT,
            _message: PhantomData,
        }
    }

    /// The same address with another limit on waiting for a restarting actor.
    pub fn with_resolve_wait(mut self, wait: Duration) -> Self {
        self.resolve_wait = wait;
        self
    }

    /// The path this address names.
    pub fn path(&self) -> &ActorPath {
        &self.node.path
    }

    /// The live instance now, if any (it may die at any moment: prefer `cast` and `call`).
    pub fn current(&self) -> Option<ActorCell> {
        match &*self.slot.borrow() {
            Slot::Running(cell) => Some(cell.clone()),
            _ => None,
        }
    }

    /// Delivers `message` to the current instance, waiting through a restart.
    pub async fn cast(&self, message: M) -> Result<(), Undelivered<M>> {
        self.deliver(message).await
    }

    /// Sends a request built around a reply port and waits for the answer.
    pub async fn call<R, F>(&self, build: F, timeout: Option<Duration>) -> Result<R, KernelError>
    where
        R: Send + 'static,
        F: FnOnce(RpcReplyPort<R>) -> M,
    {
        let (tx, rx) = oneshot();
        let port: RpcReplyPort<R> = match timeout {
            Some(limit) => (tx, limit).into(),
            None => tx.into(),
        };
        self.deliver(build(port)).await.map_err(|u| u.error)?;
        let reply = match timeout {
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(reply) => reply,
                Err(_) => {
                    return Err(KernelError::CallTimeout {
                        path: self.node.path.to_string(),
                        timeout: limit,
                    })
                }
            },
            None => rx.await,
        };
        reply.map_err(|_| KernelError::DiedBeforeReply(self.node.path.to_string()))
    }

    /// Fast path: send to the live instance straight from the slot, without cloning the
    /// receiver or the cell (this is what keeps a kernel call within a few percent of a bare
    /// ractor call). The borrow is a short read lock, released before any await.
    async fn deliver(&self, message: M) -> Result<(), Undelivered<M>> {
        let message = {
            let slot = self.slot.borrow();
            match &*slot {
                Slot::Running(cell) if cell.is_message_type_of::<M>() != Some(false) => {
                    match cell.send_message(message) {
                        Ok(()) => return Ok(()),
                        Err(MessagingErr::SendErr(back)) => back,
                        Err(MessagingErr::InvalidActorType | MessagingErr::ChannelClosed) => {
                            unreachable!("message type checked above; send never reports a closed receive channel")
                        }
                    }
                }
                _ => message,
            }
        };
        self.deliver_waiting(message).await
    }

    /// Slow path: the actor is restarting, stopping or of another type.
    async fn deliver_waiting(&self, mut message: M) -> Result<(), Undelivered<M>> {
        let mut slot = self.slot.clone();
        let mut deadline: Option<Instant> = None;
        loop {
            let current = slot.borrow_and_update().clone();
            match current {
                Slot::Running(cell) => {
                    if cell.is_message_type_of::<M>() == Some(false) {
                        return Err(Undelivered {
                            message,
                            error: KernelError::WrongMessageType {
                                path: self.node.path.to_string(),
                                expected: std::any::type_name::<M>(),
                            },
                        });
                    }
                    match cell.send_message(message) {
                        Ok(()) => return Ok(()),
                        // The instance is stopping: wait for the supervisor to publish the
                        // next one (or to say there is none).
                        Err(MessagingErr::SendErr(back)) => message = back,
                        Err(MessagingErr::InvalidActorType | MessagingErr::ChannelClosed) => {
                            unreachable!("message type checked above; send never reports a closed receive channel")
                        }
                    }
                }
                Slot::Pending => {}
                Slot::Stopped => {
                    return Err(Undelivered {
                        message,
                        error: KernelError::Stopped(self.node.path.to_string()),
                    })
                }
            }
            let limit = *deadline.get_or_insert_with(|| Instant::now() + self.resolve_wait);
            let waited = tokio::time::timeout_at(limit.into(), slot.changed()).await;
            if !matches!(waited, Ok(Ok(()))) {
                return Err(Undelivered {
                    message,
                    error: KernelError::Unavailable {
                        path: self.node.path.to_string(),
                        waited: self.resolve_wait,
                    },
                });
            }
        }
    }
}
