//! The app of README.md's "Writing an app", complete: `hello` writes a short story about
//! a topic (`POST /apps/hello/write {"topic": "a cat"}`) and counts the stories it has
//! written in a checkpoint, so the count survives its crashes and server restarts.
//! Built by `cargo test`, so the walkthrough cannot rot.

use llmos_app::axum::extract::State;
use llmos_app::axum::routing::post;
use llmos_app::axum::{Json, Router};
use llmos_app::{
    App, AppApi, AppContext, AppError, AppHandle, AppManifest, AppRegistry, Quotas, Reply,
    SamplingParams,
};
use serde_json::{json, Value};

/// The app. Built once from its settings; every instance shares it.
pub struct Hello;

/// What the app's actor handles.
pub enum HelloMsg {
    /// Write a story about `topic`; the reply is the story and the count so far.
    Write {
        /// What the story is about.
        topic: String,
        /// Where the answer goes.
        reply: Reply<Result<Value, AppError>>,
    },
}

impl App for Hello {
    type Msg = HelloMsg;
    /// Stories written so far: rebuilt from the checkpoint at every start.
    type State = u64;

    fn manifest(&self) -> AppManifest {
        AppManifest::new("writes short stories").quotas(Quotas {
            max_concurrent_requests: Some(2),
            max_kv_blocks: None,
        })
    }

    async fn start(&self, ctx: &AppContext<HelloMsg>) -> Result<u64, AppError> {
        Ok(ctx.store().get("count")?.unwrap_or(0))
    }

    async fn handle(
        &self,
        ctx: &AppContext<HelloMsg>,
        message: HelloMsg,
        count: &mut u64,
    ) -> Result<(), AppError> {
        match message {
            HelloMsg::Write { topic, reply } => {
                *count += 1;
                ctx.store().put("count", count)?;
                let number = *count;
                // Generation takes a while: do it beside the actor, which stays free.
                let completions = ctx.completions().clone();
                ctx.spawn(async move {
                    let params = SamplingParams {
                        max_tokens: 40,
                        ..SamplingParams::default()
                    };
                    let story = completions
                        .complete(&format!("Once upon a time, {topic}"), params)
                        .await
                        .map(|c| json!({ "story": c.text, "number": number }));
                    let _ = reply.send(story);
                    Ok(())
                });
            }
        }
        Ok(())
    }

    fn routes(&self, api: AppApi<HelloMsg>) -> Router {
        Router::new()
            .route("/write", post(write))
            .with_state(api.handle)
    }
}

async fn write(
    State(app): State<AppHandle<HelloMsg>>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, AppError> {
    let topic = body["topic"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AppError::BadRequest("`topic` must be a non-empty string".into()))?
        .to_string();
    let story = app
        .call(|reply| HelloMsg::Write { topic, reply }, None)
        .await??;
    Ok(Json(story))
}

fn main() {
    // In the binary this line lives in apps/llmos/src/apps.rs.
    let mut registry = AppRegistry::new();
    registry.register("hello", false, |_settings| Ok(Hello));
    println!("registered apps: {:?}", registry.names());
}
