//! The batch app's HTTP routes (served under `/apps/NAME/`): they check what clients send
//! and ask the actor through its [`AppHandle`](llmos_app::AppHandle); every error is an
//! [`AppError`], which answers with its status and an OpenAI-style JSON body.

use llmos_app::axum::body::Bytes;
use llmos_app::axum::extract::{Path, RawQuery, State};
use llmos_app::axum::http::StatusCode;
use llmos_app::axum::routing::{get, post};
use llmos_app::axum::{Json, Router};
use llmos_app::{AppApi, AppError};

use crate::job::{clip, JobCreated, JobSummary, JobView, NewJob};
use crate::worker::BatchMsg;

/// `POST /jobs`, `GET /jobs`, `GET /jobs/{id}[?wait_done=K]`.
pub(crate) fn router(api: AppApi<BatchMsg>) -> Router {
    Router::new()
        .route("/jobs", post(create).get(list))
        .route("/jobs/{id}", get(show))
        .with_state(api)
}

/// `POST /jobs`: 202 `{"id": "job-N", "total": n}`; the work goes on in the background.
///
/// Not retried when the instance dies before answering: the job may have been stored, and
/// a retry would create it twice. The client sees 503 and can list the jobs.
async fn create(
    State(api): State<AppApi<BatchMsg>>,
    body: Bytes,
) -> Result<(StatusCode, Json<JobCreated>), AppError> {
    let job = NewJob::parse(&body)?;
    let created = api
        .handle
        .call(|reply| BatchMsg::Create { job, reply }, None)
        .await??;
    Ok((StatusCode::ACCEPTED, Json(created)))
}

/// `GET /jobs`: `{"jobs": [{"id", "state", "done", "failed", "total"}, …]}`, oldest first.
async fn list(State(api): State<AppApi<BatchMsg>>) -> Result<Json<serde_json::Value>, AppError> {
    // Reads are safe to ask twice: one cut short by a restart goes to the successor, so a
    // long poll survives restarts of the app.
    let jobs: Vec<JobSummary> = api
        .handle
        .call_idempotent(|reply| BatchMsg::List { reply }, None)
        .await?;
    Ok(Json(serde_json::json!({ "jobs": jobs })))
}

/// `GET /jobs/{id}`: the job and every item. With `?wait_done=K` the answer waits until at
/// least K items are done or failed, or the job is finished (a long poll: clients bound it
/// with their own timeout). 404 for an unknown job.
async fn show(
    State(api): State<AppApi<BatchMsg>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<JobView>, AppError> {
    let wait_done = wait_done(query.as_deref())?;
    let view = api
        .handle
        .call_idempotent(
            |reply| BatchMsg::Get {
                id: id.clone(),
                wait_done,
                reply,
            },
            None,
        )
        .await??;
    Ok(Json(view))
}

/// The `wait_done` of a query string; any other parameter is an error.
fn wait_done(query: Option<&str>) -> Result<Option<usize>, AppError> {
    let mut wait = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "wait_done" {
            return Err(AppError::BadRequest(format!(
                "unknown query parameter `{}` (expected wait_done)",
                clip(name)
            )));
        }
        let count = value.parse::<usize>().map_err(|_| {
            AppError::BadRequest(format!(
                "wait_done: expected a non-negative integer, got `{}`",
                clip(value)
            ))
        })?;
        wait = Some(count);
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_done_is_the_only_query_parameter() {
        assert_eq!(wait_done(None).unwrap(), None);
        assert_eq!(wait_done(Some("")).unwrap(), None);
        assert_eq!(wait_done(Some("wait_done=3")).unwrap(), Some(3));
        for bad in [
            "wait_done=",
            "wait_done=-1",
            "wait_done=x",
            "wait=1",
            "wait_done",
        ] {
            let err = wait_done(Some(bad)).expect_err(bad);
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
