//! An example app: chat sessions whose conversation history survives the app's crash
//! and a restart of the whole server.
//!
//! Routes (under `/apps/chat/`):
//! - `POST /sessions` `{"system"?, "max_tokens"?, "temperature"?, "seed"?}` → the session;
//! - `GET /sessions`, `GET /sessions/{id}` (`?wait_turn=N` waits until turn N has ended),
//!   `DELETE /sessions/{id}`;
//! - `POST /sessions/{id}/messages` `{"content", "max_tokens"?}` → the assistant's reply.
//!
//! How it survives crashes: a session is one checkpoint (`AppStore`). A turn is
//! checkpointed as *pending* with the user's message before its request is submitted
//! (keyed by session and turn, so a resubmission finds it), and again with the runtime's
//! request id right after; the runtime journals every token.
//! When the turn ends, the history gains the user's message and the reply, and the
//! pending mark goes, in one checkpoint. A new instance (after a crash of the app or of
//! the process) re-attaches to a pending turn's request by id and finishes the turn with
//! the same text; a turn whose id was not checkpointed is submitted again by its key,
//! which finds the journaled request if there is one. A client waiting on
//! `POST …/messages` while the app restarts still gets its reply: the route waits for the
//! turn again through the app's stable handle.
//!
//! The prompt is the model's chat template over the system message, the history and the
//! new message; when that would not fit the context with room for `max_tokens`, the
//! oldest turns are left out of the prompt (they stay in the history).

mod session;

use std::collections::{BTreeMap, HashMap};

use llmos_app::axum::extract::{Path, Query, State};
use llmos_app::axum::http::StatusCode;
use llmos_app::axum::routing::{get, post};
use llmos_app::axum::{Json, Router};
use llmos_app::{
    App, AppApi, AppContext, AppError, AppHandle, AppManifest, Completion, Quotas, Reply,
    SamplingParams,
};
use serde::Deserialize;
use serde_json::Value;

use crate::session::{Pending, Session, SessionView, Turn, TurnParams, TurnView};

/// Registered name of the app.
pub const NAME: &str = "chat";

/// Checkpoint key of the session-id counter.
const NEXT_ID: &str = "next-id";

/// The app's settings (`[apps.chat.settings]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatSettings {
    /// Sessions kept at most; creating more is refused.
    pub max_sessions: usize,
    /// Longest message accepted, in characters.
    pub max_message_chars: usize,
    /// `max_tokens` of a reply when the session does not say.
    pub default_max_tokens: usize,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            max_message_chars: 16_000,
            default_max_tokens: 128,
        }
    }
}

/// The chat-session app.
pub struct ChatApp {
    settings: ChatSettings,
}

impl ChatApp {
    /// Builds the app from its settings table (`null`: defaults).
    pub fn from_settings(settings: &Value) -> Result<Self, AppError> {
        let settings: ChatSettings = if settings.is_null() {
            ChatSettings::default()
        } else {
            serde_json::from_value(settings.clone())
                .map_err(|e| AppError::Config(format!("settings: {e}")))?
        };
        if settings.max_sessions == 0 || settings.max_message_chars == 0 {
            return Err(AppError::Config(
                "settings: max_sessions and max_message_chars must be at least 1".into(),
            ));
        }
        Ok(Self { settings })
    }
}

/// Messages of the chat actor.
pub enum ChatMsg {
    /// Open a session.
    Create {
        /// Optional system message.
        system: Option<String>,
        /// Sampling of its replies.
        params: TurnParams,
        /// The new session.
        reply: Reply<Result<SessionView, AppError>>,
    },
    /// Start turn `turn` with the user's `content`. Idempotent: the same turn with the
    /// same content while it is pending answers its number again (a retry after a crash).
    Send {
        /// Session id.
        session: String,
        /// The turn the sender expects to start (history length + 1).
        turn: u32,
        /// The user's message.
        content: String,
        /// Overrides the session's `max_tokens` for this turn.
        max_tokens: Option<usize>,
        /// The turn number.
        reply: Reply<Result<u32, AppError>>,
    },
    /// Answer once turn `turn` has ended.
    Wait {
        /// Session id.
        session: String,
        /// Turn number (1-based).
        turn: u32,
        /// The finished turn.
        reply: Reply<Result<TurnView, AppError>>,
    },
    /// One session.
    Get {
        /// Session id.
        session: String,
        /// Its history.
        reply: Reply<Result<SessionView, AppError>>,
    },
    /// All sessions, briefly.
    List {
        /// Session ids with their turn counts.
        reply: Reply<Vec<Value>>,
    },
    /// Forget a session.
    Delete {
        /// Session id.
        session: String,
        /// Whether it existed.
        reply: Reply<Result<(), AppError>>,
    },
    /// A turn's request ended (sent by the instance's own task).
    TurnEnded {
        /// Session id.
        session: String,
        /// Turn number.
        turn: u32,
        /// The completion, or why it failed.
        outcome: Result<Completion, String>,
    },
    /// Submit the pending turn of a session whose request was never submitted (after a
    /// crash between the two checkpoints of a turn).
    Resubmit {
        /// Session id.
        session: String,
    },
}

/// One instance's memory: the sessions (a cache of their checkpoints) and who waits.
pub struct ChatState {
    sessions: BTreeMap<String, Session>,
    next_id: u64,
    waiters: HashMap<(String, u32), Vec<TurnWaiter>>,
}

/// Someone waiting for a turn to end.
type TurnWaiter = Reply<Result<TurnView, AppError>>;

impl App for ChatApp {
    type Msg = ChatMsg;
    type State = ChatState;

    fn manifest(&self) -> AppManifest {
        AppManifest::new("chat sessions whose history survives crashes and restarts").quotas(
            Quotas {
                max_concurrent_requests: Some(8),
                max_kv_blocks: None,
            },
        )
    }

    async fn start(&self, ctx: &AppContext<ChatMsg>) -> Result<ChatState, AppError> {
        let store = ctx.store();
        let mut sessions = BTreeMap::new();
        for key in store.keys()? {
            if key == NEXT_ID {
                continue;
            }
            if let Some(session) = store.get::<Session>(&key)? {
                sessions.insert(session.id.clone(), session);
            }
        }
        let next_id = store.get::<u64>(NEXT_ID)?.unwrap_or(1);
        for session in sessions.values() {
            let Some(pending) = &session.pending else {
                continue;
            };
            match pending.request {
                Some(request) => {
                    tracing::info!(target: "llmos::apps::chat", session = %session.id, turn = pending.turn, request, "re-attaching to a pending turn");
                    collect(
                        ctx,
                        session.id.clone(),
                        pending.turn,
                        Source::Attach(request),
                    );
                }
                None => ctx.send_self(ChatMsg::Resubmit {
                    session: session.id.clone(),
                })?,
            }
        }
        Ok(ChatState {
            sessions,
            next_id,
            waiters: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        ctx: &AppContext<ChatMsg>,
        message: ChatMsg,
        state: &mut ChatState,
    ) -> Result<(), AppError> {
        match message {
            ChatMsg::Create {
                system,
                params,
                reply,
            } => {
                let _ = reply.send(self.create(ctx, state, system, params));
            }
            ChatMsg::Send {
                session,
                turn,
                content,
                max_tokens,
                reply,
            } => {
                let result = self
                    .send(ctx, state, &session, turn, content, max_tokens)
                    .await;
                let _ = reply.send(result);
            }
            ChatMsg::Wait {
                session,
                turn,
                reply,
            } => match state.sessions.get(&session) {
                None => {
                    let _ = reply.send(Err(no_session(&session)));
                }
                Some(s) => match s.turn_view(turn) {
                    Some(view) => {
                        let _ = reply.send(Ok(view));
                    }
                    None if s.pending.as_ref().is_some_and(|p| p.turn == turn) => {
                        state
                            .waiters
                            .entry((session, turn))
                            .or_default()
                            .push(reply);
                    }
                    None => {
                        let _ = reply.send(Err(AppError::NotFound(format!(
                            "session {session} has no turn {turn}"
                        ))));
                    }
                },
            },
            ChatMsg::Get { session, reply } => {
                let view = state
                    .sessions
                    .get(&session)
                    .map(Session::view)
                    .ok_or_else(|| no_session(&session));
                let _ = reply.send(view);
            }
            ChatMsg::List { reply } => {
                let _ = reply.send(state.sessions.values().map(Session::summary).collect());
            }
            ChatMsg::Delete { session, reply } => {
                let result = match state.sessions.remove(&session) {
                    Some(_) => ctx.store().delete(&session).map(|_| ()),
                    None => Err(no_session(&session)),
                };
                state.waiters.retain(|(s, _), _| *s != session);
                let _ = reply.send(result);
            }
            ChatMsg::TurnEnded {
                session,
                turn,
                outcome,
            } => self.turn_ended(ctx, state, session, turn, outcome)?,
            ChatMsg::Resubmit { session } => {
                if let Some(s) = state.sessions.get_mut(&session) {
                    if let Some(pending) = s.pending.clone().filter(|p| p.request.is_none()) {
                        if let Err(e) = submit(ctx, s, &pending).await {
                            self.turn_ended(ctx, state, session, pending.turn, Err(e.to_string()))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn stop(&self, _ctx: &AppContext<ChatMsg>, state: &mut ChatState) {
        // Waiters are answered by the next instance: their routes retry.
        state.waiters.clear();
    }

    fn routes(&self, api: AppApi<ChatMsg>) -> Router {
        let limits = (api.handle.clone(), self.settings.clone());
        Router::new()
            .route("/sessions", post(create_session).get(list_sessions))
            .route("/sessions/{id}", get(get_session).delete(delete_session))
            .route("/sessions/{id}/messages", post(send_message))
            .with_state(limits)
    }
}

impl ChatApp {
    fn create(
        &self,
        ctx: &AppContext<ChatMsg>,
        state: &mut ChatState,
        system: Option<String>,
        params: TurnParams,
    ) -> Result<SessionView, AppError> {
        if state.sessions.len() >= self.settings.max_sessions {
            return Err(AppError::BadRequest(format!(
                "too many sessions ({}); delete some first",
                self.settings.max_sessions
            )));
        }
        let id = format!("s-{}", state.next_id);
        // The counter first: a crash after it wastes an id, never reuses one.
        ctx.store().put(NEXT_ID, &(state.next_id + 1))?;
        state.next_id += 1;
        let session = Session {
            id: id.clone(),
            system,
            params,
            turns: Vec::new(),
            pending: None,
        };
        ctx.store().put(&id, &session)?;
        let view = session.view();
        state.sessions.insert(id, session);
        Ok(view)
    }

    async fn send(
        &self,
        ctx: &AppContext<ChatMsg>,
        state: &mut ChatState,
        id: &str,
        turn: u32,
        content: String,
        max_tokens: Option<usize>,
    ) -> Result<u32, AppError> {
        let session = state.sessions.get_mut(id).ok_or_else(|| no_session(id))?;
        if let Some(pending) = &session.pending {
            if pending.turn == turn && pending.user == content {
                return Ok(turn);
            }
            return Err(AppError::BadRequest(format!(
                "session {id} has turn {} in progress; wait for it (GET /apps/chat/sessions/{id}?wait_turn={})",
                pending.turn, pending.turn
            )));
        }
        let next = session.turns.len() as u32 + 1;
        if turn != next {
            return Err(AppError::BadRequest(format!(
                "session {id} is at turn {next}, not {turn}"
            )));
        }
        let pending = Pending {
            turn,
            user: content,
            max_tokens: max_tokens.unwrap_or(session.params.max_tokens),
            request: None,
        };
        // Durable before submitting: a crash from here on finishes this turn, not loses it.
        session.pending = Some(pending.clone());
        if let Err(e) = ctx.store().put(id, &*session) {
            session.pending = None;
            return Err(e);
        }
        if let Err(e) = submit(ctx, session, &pending).await {
            session.pending = None;
            ctx.store().put(id, &*session)?;
            return Err(e);
        }
        Ok(turn)
    }

    fn turn_ended(
        &self,
        ctx: &AppContext<ChatMsg>,
        state: &mut ChatState,
        id: String,
        turn: u32,
        outcome: Result<Completion, String>,
    ) -> Result<(), AppError> {
        let Some(session) = state.sessions.get_mut(&id) else {
            return Ok(()); // deleted meanwhile
        };
        let Some(pending) = session.pending.clone().filter(|p| p.turn == turn) else {
            return Ok(()); // a duplicate report
        };
        let ended = match outcome {
            Ok(completion) => Turn {
                user: pending.user,
                assistant: completion.text,
                request: Some(completion.id),
                finish_reason: Some(format!("{:?}", completion.finish_reason).to_lowercase()),
                error: None,
            },
            Err(error) => Turn {
                user: pending.user,
                assistant: String::new(),
                request: pending.request,
                finish_reason: None,
                error: Some(error),
            },
        };
        session.turns.push(ended);
        session.pending = None;
        // If this fails the instance crashes, and its successor re-attaches to the
        // request (still pending in the checkpoint) and tries again.
        ctx.store().put(&id, &*session)?;
        let view = session.turn_view(turn);
        for waiter in state
            .waiters
            .remove(&(id.clone(), turn))
            .unwrap_or_default()
        {
            let _ = waiter.send(view.clone().ok_or_else(|| no_session(&id)));
        }
        Ok(())
    }
}

fn no_session(id: &str) -> AppError {
    AppError::NotFound(format!("no session `{id}`"))
}

/// Submits a pending turn, checkpoints its request id and reads it in the background.
async fn submit(
    ctx: &AppContext<ChatMsg>,
    session: &mut Session,
    pending: &Pending,
) -> Result<(), AppError> {
    let completions = ctx.completions();
    let context = completions.model()?.context;
    let prompt = session.prompt(completions, &pending.user, pending.max_tokens, context)?;
    let params = SamplingParams {
        max_tokens: pending.max_tokens,
        temperature: session.params.temperature,
        seed: session.params.seed,
        ..SamplingParams::default()
    };
    // Keyed: if this instance dies inside the submit, its successor finds the journaled
    // request by the key and re-attaches instead of submitting the turn twice.
    let key = format!("{}-turn-{}", session.id, pending.turn);
    let generation = completions.submit_keyed(&key, &prompt, params).await?;
    let request = generation.id;
    if let Some(p) = session.pending.as_mut() {
        p.request = Some(request);
    }
    if let Err(e) = ctx.store().put(&session.id, &*session) {
        // The turn still completes in this instance; only a crash before it ends would
        // submit it once more.
        tracing::warn!(target: "llmos::apps::chat", session = %session.id, error = %e, "could not checkpoint a turn's request id");
    }
    collect(
        ctx,
        session.id.clone(),
        pending.turn,
        Source::Running(generation),
    );
    Ok(())
}

/// Where a turn's tokens come from.
enum Source {
    /// Submitted by this instance.
    Running(llmos_app::Generation),
    /// Submitted earlier: re-attach by request id.
    Attach(u64),
}

/// Reads a turn's request to its end in a task of this instance, then reports it.
fn collect(ctx: &AppContext<ChatMsg>, session: String, turn: u32, source: Source) {
    let completions = ctx.completions().clone();
    let handle = ctx.handle().clone();
    ctx.spawn(async move {
        let generation = match source {
            Source::Running(generation) => Ok(generation),
            Source::Attach(request) => completions.attach(request, None).await,
        };
        let outcome = match generation {
            Ok(generation) => generation.collect().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        handle
            .cast(ChatMsg::TurnEnded {
                session,
                turn,
                outcome,
            })
            .await
    });
}

type RouteState = State<(AppHandle<ChatMsg>, ChatSettings)>;

fn body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(bytes).map_err(|e| AppError::BadRequest(format!("body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    system: Option<String>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    seed: Option<u64>,
}

async fn create_session(
    State((handle, settings)): RouteState,
    bytes: llmos_app::axum::body::Bytes,
) -> Result<(StatusCode, Json<SessionView>), AppError> {
    let request: CreateBody = if bytes.is_empty() {
        CreateBody {
            system: None,
            max_tokens: None,
            temperature: None,
            seed: None,
        }
    } else {
        body(&bytes)?
    };
    let params = TurnParams {
        max_tokens: request.max_tokens.unwrap_or(settings.default_max_tokens),
        temperature: request.temperature.unwrap_or(0.0),
        seed: request.seed.unwrap_or(0),
    };
    SamplingParams {
        max_tokens: params.max_tokens,
        temperature: params.temperature,
        seed: params.seed,
        ..SamplingParams::default()
    }
    .validate()
    .map_err(AppError::from)?;
    if let Some(system) = &request.system {
        check_text("system", system, &settings)?;
    }
    let view = handle
        .call(
            |reply| ChatMsg::Create {
                system: request.system.clone(),
                params,
                reply,
            },
            None,
        )
        .await??;
    Ok((StatusCode::CREATED, Json(view)))
}

fn check_text(field: &str, text: &str, settings: &ChatSettings) -> Result<(), AppError> {
    if text.trim().is_empty() {
        return Err(AppError::BadRequest(format!("{field} must not be empty")));
    }
    if text.chars().count() > settings.max_message_chars {
        return Err(AppError::BadRequest(format!(
            "{field} is longer than {} characters",
            settings.max_message_chars
        )));
    }
    Ok(())
}

async fn list_sessions(State((handle, _)): RouteState) -> Result<Json<Value>, AppError> {
    let sessions = handle
        .call_idempotent(|reply| ChatMsg::List { reply }, None)
        .await?;
    Ok(Json(
        serde_json::json!({ "object": "list", "data": sessions }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    wait_turn: Option<u32>,
}

async fn get_session(
    State((handle, _)): RouteState,
    Path(id): Path<String>,
    Query(query): Query<GetQuery>,
) -> Result<Json<SessionView>, AppError> {
    if let Some(turn) = query.wait_turn {
        handle
            .call_idempotent(
                |reply| ChatMsg::Wait {
                    session: id.clone(),
                    turn,
                    reply,
                },
                None,
            )
            .await??;
    }
    let view = handle
        .call_idempotent(
            |reply| ChatMsg::Get {
                session: id.clone(),
                reply,
            },
            None,
        )
        .await??;
    Ok(Json(view))
}

async fn delete_session(
    State((handle, _)): RouteState,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    handle
        .call(
            |reply| ChatMsg::Delete {
                session: id.clone(),
                reply,
            },
            None,
        )
        .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    content: String,
    max_tokens: Option<usize>,
}

async fn send_message(
    State((handle, settings)): RouteState,
    Path(id): Path<String>,
    bytes: llmos_app::axum::body::Bytes,
) -> Result<Json<TurnView>, AppError> {
    let request: MessageBody = body(&bytes)?;
    check_text("content", &request.content, &settings)?;
    if let Some(max_tokens) = request.max_tokens {
        SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        }
        .validate()
        .map_err(AppError::from)?;
    }
    let view = handle
        .call_idempotent(
            |reply| ChatMsg::Get {
                session: id.clone(),
                reply,
            },
            None,
        )
        .await??;
    let turn = view.turns.len() as u32 + 1;
    // Idempotent, so a retry after the app died under the call cannot start two turns.
    let turn = handle
        .call_idempotent(
            |reply| ChatMsg::Send {
                session: id.clone(),
                turn,
                content: request.content.clone(),
                max_tokens: request.max_tokens,
                reply,
            },
            None,
        )
        .await??;
    let ended = handle
        .call_idempotent(
            |reply| ChatMsg::Wait {
                session: id.clone(),
                turn,
                reply,
            },
            None,
        )
        .await??;
    match &ended.error {
        Some(error) => Err(AppError::GenerationFailed {
            request: ended.request.unwrap_or_default(),
            error: error.clone(),
        }),
        None => Ok(Json(ended)),
    }
}
