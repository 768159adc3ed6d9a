//! The app contract: the [`App`] trait an author implements, the [`AppContext`] each
//! running instance gets, the stable [`AppHandle`] that reaches the current instance, and
//! the actor that runs an app under the kernel.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use futures::FutureExt as _;
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use llmos_kernel::{Addr, Kernel, KernelError};
use tokio::task::AbortHandle;

use crate::completions::Completions;
use crate::manifest::AppManifest;
use crate::store::AppStore;
use crate::AppError;

/// Where a reply goes: the port a message carries when its sender waits for an answer
/// (see [`AppHandle::call`]).
pub type Reply<T> = RpcReplyPort<T>;

/// An app: an actor the kernel supervises, with lifecycle hooks, message handling and
/// optional HTTP routes.
///
/// The value implementing `App` is built once (from the configuration) and shared by
/// every instance; per-instance memory is [`App::State`], rebuilt by [`App::start`] at
/// every start. Anything that must survive a crash goes to the checkpoint store
/// ([`AppContext::store`]) or is a request id the runtime journals.
///
/// Failures are values: a hook that returns `Err` (or panics) crashes this instance only;
/// the `apps` supervisor restarts it by the app's [`RestartPolicy`](crate::RestartPolicy).
pub trait App: Send + Sync + Sized + 'static {
    /// Messages the app handles (from its routes, its own tasks, other apps).
    type Msg: Send + 'static;
    /// One instance's in-memory state.
    type State: Send + 'static;

    /// The app's defaults: description, restart policy, quotas, mount.
    fn manifest(&self) -> AppManifest;

    /// Runs at every start, the first and each restart: rebuild the state from
    /// checkpoints and pick up unfinished work (re-attach its requests). Keep it short;
    /// long work belongs in [`AppContext::spawn`] (a start that waits on generation
    /// would hold up the boot).
    fn start(
        &self,
        ctx: &AppContext<Self::Msg>,
    ) -> impl Future<Output = Result<Self::State, AppError>> + Send;

    /// Handles one message.
    fn handle(
        &self,
        ctx: &AppContext<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), AppError>> + Send;

    /// Runs at an orderly stop (shutdown, operator restart); not after a crash.
    fn stop(
        &self,
        ctx: &AppContext<Self::Msg>,
        state: &mut Self::State,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ctx, state);
        async {}
    }

    /// HTTP routes, served under `/apps/NAME/` (and at `/` with
    /// [`AppManifest::mount_root`]). Built once at start-up; handlers reach the running
    /// instance through `api.handle` and generate through `api.completions`.
    fn routes(&self, api: AppApi<Self::Msg>) -> Router {
        let _ = api;
        Router::new()
    }
}

/// What an app's route handlers get: a stable handle to the app's actor and the app's
/// completions (same quotas as the actor's).
pub struct AppApi<M> {
    /// Reaches the current instance across restarts.
    pub handle: AppHandle<M>,
    /// Generation under the app's quotas.
    pub completions: Completions,
    /// The app's checkpoint store (read-only use from handlers is safe; writes belong
    /// to the actor, which orders them).
    pub store: AppStore,
}

impl<M> Clone for AppApi<M> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            completions: self.completions.clone(),
            store: self.store.clone(),
        }
    }
}

/// Messages of an app's actor: the app's own, and the news that one of its tasks failed.
pub(crate) enum AppMsg<M> {
    App(M),
    TaskFailed(String),
}

/// A stable address of an app's actor: messages reach whichever instance is current,
/// waiting through a restart (up to 5 s); the caller learns when nothing answers.
pub struct AppHandle<M> {
    app: Arc<str>,
    addr: Addr<AppMsg<M>>,
}

impl<M> Clone for AppHandle<M> {
    fn clone(&self) -> Self {
        Self {
            app: self.app.clone(),
            addr: self.addr.clone(),
        }
    }
}

impl<M: Send + 'static> AppHandle<M> {
    /// The handle of app `app`'s actor at `path` (`ROOT/apps/NAME/main`); the host hands
    /// handles to routes, so this is for tests and tools.
    pub fn for_path(app: &str, kernel: &Kernel, path: &str) -> Result<Self, AppError> {
        Self::new(app, kernel, path)
    }

    pub(crate) fn new(app: &str, kernel: &Kernel, path: &str) -> Result<Self, AppError> {
        let addr = kernel
            .addr::<AppMsg<M>>(path)
            .map_err(|e| AppError::Unavailable {
                app: app.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self::from_addr(app, addr))
    }

    pub(crate) fn from_addr(app: &str, addr: Addr<AppMsg<M>>) -> Self {
        Self {
            app: app.into(),
            addr,
        }
    }

    /// Sends `message` without waiting for an answer.
    pub async fn cast(&self, message: M) -> Result<(), AppError> {
        self.addr
            .cast(AppMsg::App(message))
            .await
            .map_err(|u| self.unavailable(&u.error))
    }

    /// Sends a message carrying a reply port and waits for the answer (`None`: no limit).
    /// If the instance dies before answering, this fails with `Unavailable`: retry to
    /// reach its successor.
    pub async fn call<R: Send + 'static>(
        &self,
        build: impl FnOnce(Reply<R>) -> M,
        timeout: Option<Duration>,
    ) -> Result<R, AppError> {
        self.addr
            .call(|reply| AppMsg::App(build(reply)), timeout)
            .await
            .map_err(|e| self.unavailable(&e))
    }

    /// [`AppHandle::call`] for a message that is safe to handle twice (a read, a wait,
    /// an idempotent update): when the instance dies before it answers, the message goes
    /// to its successor (the handle waits for it), up to 20 times. Any other failure — no
    /// instance came within the wait, the app was given up — is returned at once.
    pub async fn call_idempotent<R: Send + 'static>(
        &self,
        build: impl Fn(Reply<R>) -> M,
        timeout: Option<Duration>,
    ) -> Result<R, AppError> {
        const ATTEMPTS: usize = 20;
        let mut attempt = 1;
        loop {
            match self
                .addr
                .call(|reply| AppMsg::App(build(reply)), timeout)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(e @ KernelError::DiedBeforeReply(_)) if attempt < ATTEMPTS => {
                    tracing::debug!(target: "llmos::apps", app = %self.app, error = %e, "retrying on the successor");
                    attempt += 1;
                }
                Err(e) => return Err(self.unavailable(&e)),
            }
        }
    }

    fn unavailable(&self, error: &KernelError) -> AppError {
        AppError::Unavailable {
            app: self.app.to_string(),
            reason: error.to_string(),
        }
    }
}

/// Everything an app's instance may use: its name, checkpoint store, completions, a
/// handle to itself, and tasks tied to its life.
pub struct AppContext<M> {
    name: Arc<str>,
    store: AppStore,
    completions: Completions,
    handle: AppHandle<M>,
    myself: ActorRef<AppMsg<M>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl<M: Send + 'static> AppContext<M> {
    /// The app's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The app's checkpointed state.
    pub fn store(&self) -> &AppStore {
        &self.store
    }

    /// Generation under the app's quotas.
    pub fn completions(&self) -> &Completions {
        &self.completions
    }

    /// A stable handle to the app's actor (this instance and its successors).
    pub fn handle(&self) -> &AppHandle<M> {
        &self.handle
    }

    /// Queues `message` for this instance (not a successor), also from
    /// [`App::start`]: it is handled after `start` returns, before anything sent later.
    /// Fails only when the instance is already stopping.
    pub fn send_self(&self, message: M) -> Result<(), AppError> {
        self.myself
            .send_message(AppMsg::App(message))
            .map_err(|e| AppError::Unavailable {
                app: self.name.to_string(),
                reason: format!("this instance is stopping: {e}"),
            })
    }

    /// Runs `work` beside the actor, tied to this instance: it is aborted when the
    /// instance stops or crashes, and if it fails (an `Err` or a panic) the instance
    /// crashes too and restarts by its policy. Report results by sending the app a
    /// message through [`AppContext::handle`].
    pub fn spawn<F>(&self, work: F)
    where
        F: Future<Output = Result<(), AppError>> + Send + 'static,
    {
        let myself = self.myself.clone();
        let task = tokio::spawn(async move {
            let failure = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("an app task failed: {e}"),
                Err(panic) => format!("an app task panicked: {}", panic_text(&panic)),
            };
            // Sent to this instance only: a successor is not blamed for its predecessor.
            let _ = myself.send_message(AppMsg::TaskFailed(failure));
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic".into())
}

/// The fault point evaluated before each message an app handles: `app.handle:NAME`
/// (`panic` crashes the instance as a bug would, `return` makes the hook fail).
pub fn handle_fault_point(app: &str) -> String {
    format!("app.handle:{app}")
}

/// What every instance of one app shares (outlives restarts).
pub(crate) struct AppShared<A: App> {
    pub(crate) name: Arc<str>,
    pub(crate) app: Arc<A>,
    pub(crate) store: AppStore,
    pub(crate) completions: Completions,
    pub(crate) fault_point: String,
}

/// The actor running one instance of an app.
pub(crate) struct AppActor<A: App> {
    pub(crate) shared: Arc<AppShared<A>>,
}

/// What the start function hands an instance: the handle to its own stable path.
pub(crate) type AppArgs<M> = Result<AppHandle<M>, String>;

/// One instance's state: the app's, its context, and the guard that aborts its tasks.
pub(crate) struct Instance<A: App> {
    ctx: AppContext<A::Msg>,
    state: A::State,
}

impl<M> Drop for AppContext<M> {
    /// `post_stop` does not run after a crash: the instance's tasks end here.
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl<A: App> Actor for AppActor<A> {
    type Msg = AppMsg<A::Msg>;
    type State = Instance<A>;
    type Arguments = AppArgs<A::Msg>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        handle: AppArgs<A::Msg>,
    ) -> Result<Instance<A>, ActorProcessingErr> {
        let shared = &self.shared;
        let ctx = AppContext {
            name: shared.name.clone(),
            store: shared.store.clone(),
            completions: shared.completions.clone(),
            handle: handle.map_err(AppError::Failed)?,
            myself,
            tasks: Arc::default(),
        };
        let state = shared.app.start(&ctx).await.map_err(Box::new)?;
        tracing::info!(target: "llmos::apps", app = %shared.name, "app started");
        Ok(Instance { ctx, state })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        instance: &mut Instance<A>,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AppMsg::App(message) => {
                let point = self.shared.fault_point.as_str();
                llmos_kernel::fault_point!(point, |detail: Option<String>| {
                    Err(Box::new(AppError::failed(format!(
                        "injected fault `{point}`{}",
                        detail.map(|d| format!(": {d}")).unwrap_or_default()
                    ))) as ActorProcessingErr)
                });
                self.shared
                    .app
                    .handle(&instance.ctx, message, &mut instance.state)
                    .await
                    .map_err(|e| Box::new(e) as ActorProcessingErr)
            }
            AppMsg::TaskFailed(reason) => Err(Box::new(AppError::Failed(reason))),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        instance: &mut Instance<A>,
    ) -> Result<(), ActorProcessingErr> {
        self.shared
            .app
            .stop(&instance.ctx, &mut instance.state)
            .await;
        Ok(())
    }
}
