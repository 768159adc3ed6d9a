//! The apps compiled into this binary: the one place an app is registered. Which of them
//! run is configuration (`[apps.NAME] enabled`, or `llmos serve --apps a,b`).

use std::sync::Arc;

use llmos_app::AppRegistry;
use llmos_app_batch::BatchApp;
use llmos_app_chat::ChatApp;
use llmos_gateway::{Metrics, OpenAiApp, OPENAI_APP};

/// Every app this binary can host; only the OpenAI gateway runs unless configured.
pub fn registry(metrics: Arc<Metrics>) -> AppRegistry {
    let mut registry = AppRegistry::new();
    registry.register(OPENAI_APP, true, move |_settings| {
        Ok(OpenAiApp::new(metrics.clone()))
    });
    registry.register(llmos_app_chat::NAME, false, ChatApp::from_settings);
    registry.register("batch", false, BatchApp::from_settings);
    registry
}
