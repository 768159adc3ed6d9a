//! Jobs and their items: what a client submits (parsed and checked here, so a bad body is
//! refused before it reaches the actor), what the app checkpoints, and what it answers.
//!
//! One checkpoint holds one whole [`Job`]: its sampling parameters and every item with its
//! state. An item moves `pending → running → done | failed` and never back; `running`
//! always carries the runtime's request id, which is what lets a restarted app re-attach
//! instead of generating again.

use llmos_app::{AppError, FinishReason, SamplingParams};
use llmos_inference::InferenceError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most prompts one job may hold.
pub const MAX_PROMPTS: usize = 1000;

/// `max_tokens` when the body does not say.
pub const DEFAULT_MAX_TOKENS: usize = 64;

/// The fields `POST /jobs` accepts.
const FIELDS: &str = "prompts, max_tokens, temperature, seed, stop";

/// A checked `POST /jobs` body: the prompts and how to sample every one of them.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    /// The prompts, in order (1 to [`MAX_PROMPTS`], none empty).
    pub prompts: Vec<String>,
    /// Sampling for every prompt of the job.
    pub params: JobParams,
}

/// How every item of a job is sampled (the job's part of [`SamplingParams`]; the rest
/// keeps its defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobParams {
    /// Tokens generated at most per item.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// Seed of each item's sampling RNG (the same for every item).
    pub seed: u64,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
}

impl JobParams {
    /// The runtime's parameters for one item.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            seed: self.seed,
            stop: self.stop.clone(),
            ..SamplingParams::default()
        }
    }
}

impl NewJob {
    /// Parses and checks a `POST /jobs` body. A body that is not JSON or not an object, an
    /// unknown field and a missing `prompts` are `BadRequest` (400); a value of the wrong
    /// kind or out of range (the sampler's ranges included) is `InvalidField` (422, the
    /// field as the error body's `param`). Every message names the field.
    pub fn parse(body: &[u8]) -> Result<NewJob, AppError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(bad(format!(
                "the body must be a JSON object with the fields {FIELDS}"
            )));
        };
        if let Some(unknown) = fields.keys().find(|k| !FIELDS.split(", ").any(|f| f == *k)) {
            return Err(bad(format!(
                "unknown field `{}` (expected {FIELDS})",
                clip(unknown)
            )));
        }
        let prompts = prompts(&fields)?;
        let params = JobParams {
            max_tokens: optional(&fields, "max_tokens", DEFAULT_MAX_TOKENS, |v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or("expected a non-negative integer")
            })?,
            temperature: optional(&fields, "temperature", 0.0, |v| {
                v.as_f64().map(|t| t as f32).ok_or("expected a number")
            })?,
            seed: optional(&fields, "seed", 0, |v| {
                v.as_u64().ok_or("expected a non-negative integer")
            })?,
            stop: optional(&fields, "stop", Vec::new(), |v| {
                v.as_array()
                    .and_then(|list| {
                        list.iter()
                            .map(|s| s.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or("expected a list of strings")
            })?,
        };
        // The ranges are the sampler's own.
        params.sampling().validate().map_err(sampler_field)?;
        Ok(NewJob { prompts, params })
    }
}

fn prompts(fields: &Map<String, Value>) -> Result<Vec<String>, AppError> {
    let list = match fields.get("prompts") {
        None | Some(Value::Null) => {
            return Err(bad(format!(
                "prompts: required (a list of 1 to {MAX_PROMPTS} strings)"
            )))
        }
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(invalid(
                "prompts",
                format!("expected a list of strings, got {}", kind(other)),
            ))
        }
    };
    if list.is_empty() {
        return Err(invalid(
            "prompts",
            format!("the list is empty (give 1 to {MAX_PROMPTS} prompts)"),
        ));
    }
    if list.len() > MAX_PROMPTS {
        return Err(invalid(
            "prompts",
            format!("{} prompts; a job holds at most {MAX_PROMPTS}", list.len()),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, prompt)| match prompt {
            Value::String(s) if s.is_empty() => {
                Err(invalid(&format!("prompts[{i}]"), "empty prompt".into()))
            }
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid(
                &format!("prompts[{i}]"),
                format!("expected a string, got {}", kind(other)),
            )),
        })
        .collect()
}

/// An optional field: `default` when absent or `null`, else `read` it.
fn optional<T>(
    fields: &Map<String, Value>,
    name: &str,
    default: T,
    read: impl FnOnce(&Value) -> Result<T, &'static str>,
) -> Result<T, AppError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => {
            read(value).map_err(|why| invalid(name, format!("{why}, got {}", kind(value))))
        }
    }
}

/// A body the app cannot read as a job at all (400).
fn bad(message: String) -> AppError {
    AppError::BadRequest(message)
}

/// A field with a value of the wrong kind or out of range (422, `param` = `field`).
fn invalid(field: &str, message: String) -> AppError {
    AppError::InvalidField {
        field: field.to_string(),
        message,
    }
}

/// The sampler's refusal as the field it names (its messages read `field: reason`).
fn sampler_field(error: InferenceError) -> AppError {
    match error {
        InferenceError::InvalidParams(message) => match message.split_once(": ") {
            Some((field, reason)) => invalid(field, reason.to_string()),
            None => InferenceError::InvalidParams(message).into(),
        },
        other => other.into(),
    }
}

/// What a JSON value is, for messages (the value itself may be huge).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(n) if n.is_i64() && n.as_i64().is_some_and(|n| n < 0) => "a negative number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// At most 64 characters of client-supplied text, for messages.
pub(crate) fn clip(text: &str) -> String {
    let mut clipped: String = text.chars().take(64).collect();
    if clipped.len() < text.len() {
        clipped.push('…');
    }
    clipped
}

/// Where an item is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Not submitted yet, refused for lack of room, or being submitted (`submissions` is 1
    /// and there is no request id yet: the submission goes through again after a crash,
    /// and finds the request by the item's key if there is one).
    Pending,
    /// Submitted: the runtime journals it under `request`; the app is reading it.
    Running,
    /// Finished: `text` and `finish_reason` are set. Never touched again.
    Done,
    /// Failed for good: `error` says why. Never touched again.
    Failed,
}

/// One prompt of a job and what became of it. This is both the checkpointed record and
/// (with its index) what `GET /jobs/{id}` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The prompt.
    pub prompt: String,
    /// Its state.
    pub state: ItemState,
    /// The runtime's request id, from the moment it was submitted.
    pub request: Option<u64>,
    /// The generated text, once done.
    pub text: Option<String>,
    /// `stop` or `length`, once done.
    pub finish_reason: Option<FinishReason>,
    /// Why it failed, once failed.
    pub error: Option<String>,
    /// How many requests were created for it, as the runtime's journal shows them: raised
    /// to 1 (and checkpointed) before its first submission, so no crash can lose the
    /// count, then set by each submission to 1 if a request was under the item's key
    /// before it, plus 1 if it created a new one. 1 for every finished item means nothing
    /// was generated twice. A request that ended without generating a token is not
    /// counted (see `rekeyed`). See [`worker`](crate::worker).
    pub submissions: u32,
    /// How many times the item moved to a fresh key ([`Job::key`]) because the request
    /// under its key had ended without generating a token: the runtime journaled it but
    /// could not start it, as when an orderly shutdown refused its task. Submitting again
    /// then redoes nothing. Left out of the JSON while 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rekeyed: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Item {
    fn new(prompt: String) -> Self {
        Self {
            prompt,
            state: ItemState::Pending,
            request: None,
            text: None,
            finish_reason: None,
            error: None,
            submissions: 0,
            rekeyed: 0,
        }
    }

    /// Done or failed: the item will never change again.
    pub fn settled(&self) -> bool {
        matches!(self.state, ItemState::Done | ItemState::Failed)
    }

    /// Records the end of its generation.
    pub(crate) fn finish(&mut self, text: String, reason: FinishReason) {
        self.state = ItemState::Done;
        self.text = Some(text);
        self.finish_reason = Some(reason);
    }

    /// Pending with a submission under way, or cut short by a crash (see
    /// [`ItemState::Pending`]).
    pub fn submitting(&self) -> bool {
        self.state == ItemState::Pending && self.submissions > 0
    }

    /// Records a failure for good.
    pub(crate) fn fail(&mut self, error: String) {
        self.state = ItemState::Failed;
        self.error = Some(error);
    }
}

/// A job: the checkpointed record under key `job-N`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// N of `job-N`.
    pub id: u64,
    /// How its items are sampled.
    pub params: JobParams,
    /// Its items, in the order of the prompts.
    pub items: Vec<Item>,
}

impl Job {
    /// A new job, every item pending.
    pub fn new(id: u64, request: NewJob) -> Self {
        Self {
            id,
            params: request.params,
            items: request.prompts.into_iter().map(Item::new).collect(),
        }
    }

    /// Its name (and checkpoint key): `job-N`.
    pub fn name(&self) -> String {
        job_name(self.id)
    }

    /// The key item `index` is submitted under: `job-N-item-I`, with `-K` after it once
    /// it was rekeyed K times.
    pub fn key(&self, index: usize) -> String {
        match self.items[index].rekeyed {
            0 => format!("{}-item-{index}", self.name()),
            k => format!("{}-item-{index}-{k}", self.name()),
        }
    }

    /// Items done or failed.
    pub fn settled(&self) -> usize {
        self.items.iter().filter(|i| i.settled()).count()
    }

    /// Every item is done or failed.
    pub fn finished(&self) -> bool {
        self.settled() == self.items.len()
    }

    /// The job's counts.
    pub fn summary(&self) -> JobSummary {
        let count = |state| self.items.iter().filter(|i| i.state == state).count();
        JobSummary {
            id: self.name(),
            state: if self.finished() {
                JobState::Done
            } else {
                JobState::Running
            },
            done: count(ItemState::Done),
            failed: count(ItemState::Failed),
            total: self.items.len(),
        }
    }

    /// The whole job, as `GET /jobs/{id}` shows it.
    pub fn view(&self) -> JobView {
        JobView {
            summary: self.summary(),
            items: self
                .items
                .iter()
                .enumerate()
                .map(|(index, item)| ItemView {
                    index,
                    item: item.clone(),
                })
                .collect(),
        }
    }
}

/// `job-N`.
pub fn job_name(id: u64) -> String {
    format!("job-{id}")
}

/// N of `job-N`, if `name` is one.
pub fn parse_job_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("job-")?;
    // `parse` alone would also take `+1`; ids are plain digits.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether a job still has work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Some item is pending or running.
    Running,
    /// Every item is done or failed.
    Done,
}

/// A job's counts: an entry of `GET /jobs`, and the head of `GET /jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobSummary {
    /// `job-N`.
    pub id: String,
    /// `running` or `done`.
    pub state: JobState,
    /// Items done.
    pub done: usize,
    /// Items failed.
    pub failed: usize,
    /// Items in all.
    pub total: usize,
}

/// One item in `GET /jobs/{id}`: its index and its record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ItemView {
    /// Its position in the job's prompts.
    pub index: usize,
    /// What became of it.
    #[serde(flatten)]
    pub item: Item,
}

/// The body of `GET /jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobView {
    /// The counts.
    #[serde(flatten)]
    pub summary: JobSummary,
    /// Every item.
    pub items: Vec<ItemView>,
}

/// The body of `POST /jobs`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobCreated {
    /// `job-N`: poll `GET /jobs/job-N`.
    pub id: String,
    /// Items in the job.
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<NewJob, AppError> {
        NewJob::parse(body.to_string().as_bytes())
    }

    /// A refusal's status, `param` (the field, for a 422) and message.
    fn refusal(result: Result<NewJob, AppError>) -> (u16, Option<String>, String) {
        let err = result.expect_err("refused");
        let param = match &err {
            AppError::InvalidField { field, .. } => Some(field.clone()),
            _ => None,
        };
        (err.status().as_u16(), param, err.to_string())
    }

    #[test]
    fn defaults_fill_what_the_body_leaves_out() {
        let job = parse(json!({"prompts": ["a", "b"]})).unwrap();
        assert_eq!(job.prompts, ["a", "b"]);
        assert_eq!(
            job.params,
            JobParams {
                max_tokens: DEFAULT_MAX_TOKENS,
                temperature: 0.0,
                seed: 0,
                stop: vec![],
            }
        );
        let job = parse(json!({
            "prompts": ["a"], "max_tokens": 5, "temperature": 0.5, "seed": 9, "stop": ["x"]
        }))
        .unwrap();
        let sampling = job.params.sampling();
        assert_eq!(
            (sampling.max_tokens, sampling.temperature, sampling.seed),
            (5, 0.5, 9)
        );
        assert_eq!(sampling.stop, ["x"]);
        assert!(parse(json!({"prompts": ["a"], "stop": null, "seed": null})).is_ok());
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let too_many: Vec<String> = (0..=MAX_PROMPTS).map(|i| i.to_string()).collect();
        // (body, status, param, a part of the message)
        let cases = [
            (json!([1, 2]), 400, None, "JSON object"),
            (json!({}), 400, None, "prompts: required"),
            (json!({"prompts": null}), 400, None, "prompts: required"),
            (
                json!({"prompts": ["a"], "top_k": 3}),
                400,
                None,
                "unknown field `top_k`",
            ),
            (
                json!({"prompts": "a"}),
                422,
                Some("prompts"),
                "prompts: expected a list",
            ),
            (
                json!({"prompts": []}),
                422,
                Some("prompts"),
                "prompts: the list is empty",
            ),
            (
                json!({ "prompts": too_many }),
                422,
                Some("prompts"),
                "at most 1000",
            ),
            (
                json!({"prompts": ["a", 3]}),
                422,
                Some("prompts[1]"),
                "prompts[1]: expected a string, got a number",
            ),
            (
                json!({"prompts": ["a", ""]}),
                422,
                Some("prompts[1]"),
                "prompts[1]: empty",
            ),
            (
                json!({"prompts": ["a"], "max_tokens": -1}),
                422,
                Some("max_tokens"),
                "a negative number",
            ),
            (
                json!({"prompts": ["a"], "max_tokens": 1.5}),
                422,
                Some("max_tokens"),
                "a fractional number",
            ),
            (
                json!({"prompts": ["a"], "max_tokens": 0}),
                422,
                Some("max_tokens"),
                "max_tokens: must be at least 1",
            ),
            (
                json!({"prompts": ["a"], "temperature": "hot"}),
                422,
                Some("temperature"),
                "temperature: expected a number, got a string",
            ),
            (
                json!({"prompts": ["a"], "temperature": -1}),
                422,
                Some("temperature"),
                "not in [0, 100]",
            ),
            (
                json!({"prompts": ["a"], "seed": -3}),
                422,
                Some("seed"),
                "seed",
            ),
            (
                json!({"prompts": ["a"], "stop": "x"}),
                422,
                Some("stop"),
                "expected a list of strings",
            ),
            (
                json!({"prompts": ["a"], "stop": [""]}),
                422,
                Some("stop"),
                "must not be empty",
            ),
        ];
        for (body, status, param, needle) in cases {
            let (got, got_param, text) = refusal(parse(body.clone()));
            assert_eq!(got, status, "{body}: {text}");
            assert_eq!(got_param.as_deref(), param, "{body}: {text}");
            assert!(text.contains(needle), "{body}: {text}");
        }
        let (status, param, text) = refusal(NewJob::parse(b"{\"prompts\": ["));
        assert_eq!((status, param), (400, None));
        assert!(text.contains("not valid JSON"), "{text}");
    }

    /// What the client sees of a refused field: 422 with the field as `param`.
    #[tokio::test]
    async fn an_invalid_field_answers_422_with_its_param() {
        use llmos_app::axum::response::IntoResponse;
        let err = parse(json!({"prompts": ["a", 7]})).expect_err("refused");
        let response = err.into_response();
        assert_eq!(response.status().as_u16(), 422);
        let body = llmos_app::axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["param"], "prompts[1]", "{body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{body}");
        assert_eq!(
            body["error"]["message"],
            "prompts[1]: expected a string, got a number"
        );
    }

    #[test]
    fn job_names_round_trip_and_nothing_else_parses() {
        assert_eq!(parse_job_name(&job_name(42)), Some(42));
        for bad in ["job-", "job-+1", "job--1", "job-1x", "jobs-1", "1", ""] {
            assert_eq!(parse_job_name(bad), None, "{bad}");
        }
        assert_eq!(parse_job_name("job-99999999999999999999999"), None);
    }

    #[test]
    fn views_count_and_flatten() {
        let mut job = Job::new(
            3,
            NewJob {
                prompts: vec!["a".into(), "b".into(), "c".into()],
                params: JobParams {
                    max_tokens: 4,
                    temperature: 0.0,
                    seed: 0,
                    stop: vec![],
                },
            },
        );
        job.items[0].finish("x".into(), FinishReason::Length);
        job.items[1].fail("no".into());
        let view = serde_json::to_value(job.view()).unwrap();
        assert_eq!(view["id"], "job-3");
        assert_eq!(view["state"], "running");
        assert_eq!(
            (view["done"].clone(), view["failed"].clone()),
            (json!(1), json!(1))
        );
        assert_eq!(view["items"][0]["finish_reason"], "length");
        assert_eq!(view["items"][1]["state"], "failed");
        assert_eq!(view["items"][2]["index"], 2);
        assert_eq!(view["items"][2]["request"], Value::Null);
        job.items[2].fail("no".into());
        assert_eq!(job.summary().state, JobState::Done);
        let stored: Job = serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
        assert_eq!(stored, job);
    }
}
