//! The app host: the registry of apps compiled into the binary, the `apps` supervisor
//! that runs the enabled ones, and their HTTP routes.
//!
//! ```text
//! llmos/apps              one_for_one   permanent
//! ├─ openai               one_for_one   temporary; the app's intensity and backoff
//! │  └─ main              the app actor; the app's restart type
//! └─ chat
//!    └─ main
//! ```
//! An app's own supervisor enforces its policy. When the app crashes more often than
//! its policy allows, that supervisor escalates and, being temporary, is removed: the
//! app is *given up* (503 on its routes, reported by `GET /apps` and `/health`) while
//! every other app and request keeps running. `apps` itself therefore never sees a crash
//! loop and never escalates to the root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use llmos_inference::Runtime;
use llmos_kernel::{ChildSpec, Kernel, KernelEvent, RestartType, Strategy, SupervisorSpec};
use serde::Serialize;
use serde_json::Value;

use crate::app::{App, AppActor, AppApi, AppHandle, AppShared};
use crate::completions::{Completions, QuotaUsage};
use crate::manifest::{AppConfig, AppManifest, Quotas};
use crate::store::AppStore;
use crate::AppError;

/// The name of the supervisor of all apps, under the root.
pub const APPS: &str = "apps";

type Build = Arc<dyn Fn(&str, &Value) -> Result<Box<dyn Installable>, AppError> + Send + Sync>;

struct Entry {
    enabled_by_default: bool,
    build: Build,
}

/// The apps compiled into the binary, by name. Which of them run is configuration.
#[derive(Default)]
pub struct AppRegistry {
    entries: BTreeMap<String, Entry>,
}

impl AppRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an app under `name` (lower-case letters, digits and `-`). `build` makes
    /// the app from its `settings` table (`[apps.NAME.settings]`, JSON `null` when
    /// absent); it is called once per process, and an `Err` refuses the start-up with
    /// that message. Panics on a bad or duplicate name: that is a bug in the binary.
    pub fn register<A, F>(&mut self, name: &str, enabled_by_default: bool, build: F) -> &mut Self
    where
        A: App,
        F: Fn(&Value) -> Result<A, AppError> + Send + Sync + 'static,
    {
        assert!(
            valid_name(name),
            "app name `{name}`: use lower-case letters, digits and -"
        );
        assert!(
            !self.entries.contains_key(name),
            "app `{name}` registered twice"
        );
        let build: Build = Arc::new(move |_name: &str, settings: &Value| {
            let app = build(settings)?;
            Ok(Box::new(Typed(Some(app))) as Box<dyn Installable>)
        });
        self.entries.insert(
            name.to_string(),
            Entry {
                enabled_by_default,
                build,
            },
        );
        self
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A built app, not yet given its shared state.
trait Installable: Send {
    fn manifest(&self) -> AppManifest;
    fn install(
        self: Box<Self>,
        name: &str,
        manifest: AppManifest,
        runtime: &Runtime,
        dir: PathBuf,
    ) -> Result<Arc<dyn Hosted>, AppError>;
}

struct Typed<A>(Option<A>);

impl<A: App> Installable for Typed<A> {
    fn manifest(&self) -> AppManifest {
        self.0
            .as_ref()
            .map(App::manifest)
            .unwrap_or_else(|| AppManifest::new(""))
    }

    fn install(
        mut self: Box<Self>,
        name: &str,
        manifest: AppManifest,
        runtime: &Runtime,
        dir: PathBuf,
    ) -> Result<Arc<dyn Hosted>, AppError> {
        let app = self
            .0
            .take()
            .ok_or_else(|| AppError::Config(format!("app `{name}` installed twice")))?;
        let shared = Arc::new(AppShared {
            name: name.into(),
            app: Arc::new(app),
            store: AppStore::open(name, dir)?,
            completions: Completions::new(name, runtime.clone(), manifest.quotas),
            fault_point: crate::app::handle_fault_point(name),
        });
        llmos_kernel::faults::declare(
            &shared.fault_point,
            "this app's message handling fails (panic: crash as a bug would)",
        );
        Ok(Arc::new(Installed { shared, manifest }))
    }
}

/// An enabled app, type-erased for the host.
trait Hosted: Send + Sync {
    fn name(&self) -> &str;
    fn manifest(&self) -> &AppManifest;
    fn completions(&self) -> &Completions;
    fn child_spec(&self) -> ChildSpec;
    fn routes(&self, kernel: &Kernel, path: &str) -> Result<Router, AppError>;
}

struct Installed<A: App> {
    shared: Arc<AppShared<A>>,
    manifest: AppManifest,
}

impl<A: App> Hosted for Installed<A> {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn manifest(&self) -> &AppManifest {
        &self.manifest
    }

    fn completions(&self) -> &Completions {
        &self.shared.completions
    }

    fn child_spec(&self) -> ChildSpec {
        let shared = self.shared.clone();
        let policy = &self.manifest.policy;
        let actor = ChildSpec::worker("main", move |start| {
            let handle = start
                .addr(start.path().as_str())
                .map(|addr| AppHandle::from_addr(&shared.name, addr))
                .map_err(|e| e.to_string());
            (
                AppActor {
                    shared: shared.clone(),
                },
                handle,
            )
        })
        .restart(policy.restart);
        let supervisor = SupervisorSpec::new(Strategy::OneForOne)
            .intensity(policy.max_restarts, policy.period)
            .backoff(policy.backoff())
            .child(actor);
        ChildSpec::supervisor(self.shared.name.to_string(), supervisor)
            .restart(RestartType::Temporary)
    }

    fn routes(&self, kernel: &Kernel, path: &str) -> Result<Router, AppError> {
        let api = AppApi {
            handle: AppHandle::new(&self.shared.name, kernel, path)?,
            completions: self.shared.completions.clone(),
            store: self.shared.store.clone(),
        };
        Ok(self.shared.app.routes(api))
    }
}

/// How an app is doing, for `GET /apps`, `/health` and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct AppStatus {
    /// The app's name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// `running`, `starting`, `restarting`, `given_up` or `stopped`.
    pub state: String,
    /// Restarts of its actor so far.
    pub restarts: u64,
    /// `permanent`, `transient` or `temporary`.
    pub restart: String,
    /// Restarts allowed within `period_secs`.
    pub max_restarts: u32,
    /// The intensity window.
    pub period_secs: f64,
    /// Its quotas.
    pub quotas: Quotas,
    /// What it holds now.
    pub usage: QuotaUsage,
    /// Where its routes are served.
    pub mounts: Vec<String>,
}

/// The enabled apps of this process and their supervisor.
#[derive(Clone)]
pub struct AppHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    runtime: Runtime,
    apps: Vec<Arc<dyn Hosted>>,
    given_up: Mutex<BTreeMap<String, String>>,
}

impl AppHost {
    /// Builds the enabled apps: `configs` holds the `[apps.NAME]` tables; `only`, when
    /// given (the `--apps` flag), replaces every `enabled` setting. Unknown names, bad
    /// settings and two apps at `/` are errors naming what is wrong.
    pub fn new(
        runtime: &Runtime,
        registry: &AppRegistry,
        configs: &BTreeMap<String, AppConfig>,
        only: Option<&[String]>,
    ) -> Result<Self, AppError> {
        let known = registry.names().join(", ");
        if let Some(name) = configs
            .keys()
            .chain(only.into_iter().flatten())
            .find(|n| !registry.entries.contains_key(n.as_str()))
        {
            return Err(AppError::Config(format!(
                "unknown app `{name}` (this binary has: {known})"
            )));
        }
        let default_config = AppConfig::default();
        let mut apps: Vec<Arc<dyn Hosted>> = Vec::new();
        for (name, entry) in &registry.entries {
            let config = configs.get(name).unwrap_or(&default_config);
            let enabled = match only {
                Some(list) => list.iter().any(|n| n == name),
                None => config.enabled.unwrap_or(entry.enabled_by_default),
            };
            if !enabled {
                continue;
            }
            let built = (entry.build)(name, &config.settings).map_err(|e| match e {
                AppError::Config(m) => AppError::Config(format!("[apps.{name}] {m}")),
                other => AppError::Config(format!("[apps.{name}] {other}")),
            })?;
            let manifest = built.manifest().with_config(name, config)?;
            let dir = runtime.services().config.state_dir.join("apps").join(name);
            apps.push(built.install(name, manifest, runtime, dir)?);
        }
        let at_root: Vec<&str> = apps
            .iter()
            .filter(|a| a.manifest().mount_root)
            .map(|a| a.name())
            .collect();
        if at_root.len() > 1 {
            return Err(AppError::Config(format!(
                "apps {} all ask to be served at `/`; at most one may (set mount_root = false)",
                at_root.join(", ")
            )));
        }
        Ok(Self {
            inner: Arc::new(HostInner {
                runtime: runtime.clone(),
                apps,
                given_up: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// Names of the enabled apps.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .apps
            .iter()
            .map(|a| a.name().to_string())
            .collect()
    }

    /// Starts the `apps` supervisor under the root, with every enabled app. Call it after
    /// `Runtime::resume_unfinished`, so apps re-attach to requests that are running.
    pub async fn start(&self) -> Result<(), AppError> {
        let kernel = self.inner.runtime.kernel().clone();
        let mut spec = SupervisorSpec::new(Strategy::OneForOne)
            // An app's own supervisor bounds its crash loop; this only catches a storm.
            .intensity(1000, Duration::from_secs(10));
        for app in &self.inner.apps {
            spec = spec.child(app.child_spec());
        }
        let mut events = kernel.subscribe();
        let apps_path = format!("{}/{APPS}", kernel.root_path());
        let host = Arc::downgrade(&self.inner);
        let watched = apps_path.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let KernelEvent::Escalated { path, .. } = &event else {
                    continue;
                };
                if path.parent().is_some_and(|p| p.as_str() == watched) {
                    let Some(host) = host.upgrade() else { return };
                    tracing::error!(target: "llmos::apps", app = path.name(), "app crashed more often than its policy allows: given up");
                    host.given_up
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            path.name().to_string(),
                            "crashed more often than its restart policy allows".into(),
                        );
                }
            }
        });
        kernel
            .start_child(
                kernel.root_path().as_str(),
                ChildSpec::supervisor(APPS, spec).restart(RestartType::Permanent),
            )
            .await
            .map_err(|e| AppError::Config(format!("cannot start the apps: {e}")))?;
        Ok(())
    }

    /// The HTTP routes of every enabled app (under `/apps/NAME/`, and at `/` for the app
    /// that asks), plus `GET /apps`. Call after [`AppHost::start`].
    pub fn router(&self) -> Result<Router, AppError> {
        let kernel = self.inner.runtime.kernel();
        let mut router = Router::new().route("/apps", get(list_apps).with_state(self.clone()));
        for app in &self.inner.apps {
            let path = format!("{}/{APPS}/{}/main", kernel.root_path(), app.name());
            let routes = app.routes(kernel, &path)?;
            if !routes.has_routes() {
                continue;
            }
            let gate = (self.clone(), app.name().to_string());
            let routes = routes.layer(middleware::from_fn_with_state(gate, available));
            if app.manifest().mount_root {
                router = router.merge(routes.clone());
            }
            router = router.nest(&format!("/apps/{}", app.name()), routes);
        }
        Ok(router)
    }

    /// Every enabled app's status.
    pub fn status(&self) -> Vec<AppStatus> {
        let snapshot = self.inner.runtime.kernel().snapshot();
        let root = self.inner.runtime.kernel().root_path().to_string();
        let given_up = self
            .inner
            .given_up
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner
            .apps
            .iter()
            .map(|app| {
                let manifest = app.manifest();
                let node = snapshot.find(&format!("{root}/{APPS}/{}/main", app.name()));
                let state = if given_up.contains_key(app.name()) {
                    "given_up".to_string()
                } else {
                    node.map_or("stopped".to_string(), |n| {
                        format!("{:?}", n.state).to_lowercase()
                    })
                };
                let mut mounts = vec![format!("/apps/{}/", app.name())];
                if manifest.mount_root {
                    mounts.push("/".into());
                }
                AppStatus {
                    name: app.name().to_string(),
                    description: manifest.description.clone(),
                    state,
                    restarts: node.map_or(0, |n| n.restarts),
                    restart: format!("{:?}", manifest.policy.restart).to_lowercase(),
                    max_restarts: manifest.policy.max_restarts,
                    period_secs: manifest.policy.period.as_secs_f64(),
                    quotas: manifest.quotas,
                    usage: app.completions().usage(),
                    mounts,
                }
            })
            .collect()
    }

    /// Why the apps are not all well (empty when they are): apps given up.
    pub fn health_reasons(&self) -> Vec<String> {
        self.inner
            .given_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, why)| format!("app {name} given up: {why}"))
            .collect()
    }

    fn given_up(&self, app: &str) -> Option<String> {
        self.inner
            .given_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(app)
            .cloned()
    }
}

async fn list_apps(State(host): State<AppHost>) -> Json<Value> {
    Json(serde_json::json!({ "object": "list", "data": host.status() }))
}

/// Answers 503 for an app that was given up, instead of letting its handlers wait on an
/// actor that is not coming back.
async fn available(
    State((host, app)): State<(AppHost, String)>,
    request: Request,
    next: Next,
) -> Response {
    match host.given_up(&app) {
        Some(reason) => AppError::Unavailable { app, reason }.into_response(),
        None => next.run(request).await,
    }
}
