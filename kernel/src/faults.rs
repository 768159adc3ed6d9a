//! Named fault points: configured from `LLMOS_FAILPOINTS` at boot and through the kernel
//! API at run time, evaluated with [`crate::fault_point!`] in product code.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;

use crate::error::KernelError;

/// The environment variable read at boot: `point=actions[;point=actions…]`, in the `fail`
/// crate's action syntax (e.g. `kernel.demo=3*off->1*panic->off`).
pub const ENV_VAR: &str = "LLMOS_FAILPOINTS";

/// A fault point some part of the product declared, with what injecting it simulates.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FaultPointInfo {
    /// The point's name, e.g. `engine.step`.
    pub name: String,
    /// What a fault injected there simulates.
    pub description: String,
    /// Its current action, if configured.
    pub actions: Option<String>,
}

fn declared() -> &'static Mutex<BTreeMap<String, String>> {
    static DECLARED: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();
    DECLARED.get_or_init(|| {
        Mutex::new(BTreeMap::from([(
            crate::supervisor::START_FAULT_POINT.to_string(),
            "a child's start fails (`kernel.start=return`; one child: `kernel.start:PATH=return`)"
                .to_string(),
        )]))
    })
}

/// Declares a fault point so tools can list it. Evaluating an undeclared point still works.
pub fn declare(name: &str, description: &str) {
    declared()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), description.to_string());
}

/// Every declared point with its current action.
pub fn list() -> Vec<FaultPointInfo> {
    let configured: BTreeMap<String, String> = fail::list().into_iter().collect();
    let mut all: BTreeMap<String, FaultPointInfo> = declared()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(name, description)| {
            (
                name.clone(),
                FaultPointInfo {
                    name: name.clone(),
                    description: description.clone(),
                    actions: configured.get(name).cloned(),
                },
            )
        })
        .collect();
    for (name, actions) in configured {
        all.entry(name.clone()).or_insert(FaultPointInfo {
            name,
            description: String::new(),
            actions: Some(actions),
        });
    }
    all.into_values().collect()
}

/// Sets the actions of one point (`off` disables it).
pub fn configure(name: &str, actions: &str) -> Result<(), KernelError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(KernelError::BadFaultSpec {
            spec: format!("{name}={actions}"),
            reason: "empty point name".into(),
        });
    }
    fail::cfg(name, actions.trim()).map_err(|reason| KernelError::BadFaultSpec {
        spec: format!("{name}={actions}"),
        reason,
    })
}

/// Removes the configuration of one point.
pub fn clear(name: &str) {
    fail::remove(name);
}

/// Applies a `point=actions;point=actions` specification; all or nothing is validated
/// before anything is applied.
pub fn configure_spec(spec: &str) -> Result<(), KernelError> {
    let mut parsed = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| KernelError::BadFaultSpec {
                spec: entry.to_string(),
                reason: "expected POINT=ACTIONS".into(),
            })?;
        parsed.push((name.trim().to_string(), actions.trim().to_string()));
    }
    for (name, actions) in &parsed {
        // `fail` validates while applying; check first on a scratch name so a bad entry
        // leaves earlier ones unapplied.
        fail::cfg("llmos.validate.scratch", actions).map_err(|reason| {
            KernelError::BadFaultSpec {
                spec: format!("{name}={actions}"),
                reason,
            }
        })?;
        fail::remove("llmos.validate.scratch");
    }
    for (name, actions) in parsed {
        configure(&name, &actions)?;
    }
    Ok(())
}

/// Applies `LLMOS_FAILPOINTS` if it is set.
pub fn configure_from_env() -> Result<(), KernelError> {
    match std::env::var(ENV_VAR) {
        Ok(spec) => configure_spec(&spec),
        Err(_) => Ok(()),
    }
}

/// Evaluates a named fault point in product code. Same forms as `fail::fail_point!`:
/// `fault_point!("name")` (panic, sleep, pause…), `fault_point!("name", |arg| expr)` to
/// return early with a value when the action is `return`.
#[macro_export]
macro_rules! fault_point {
    ($($args:tt)*) => {
        $crate::__fail::fail_point!($($args)*)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing_rejects_garbage_without_applying_anything() {
        let err = configure_spec("faults.test.ok=return;faults.test.bad=explode").unwrap_err();
        assert!(matches!(err, KernelError::BadFaultSpec { .. }), "{err}");
        assert!(!fail::list().iter().any(|(n, _)| n == "faults.test.ok"));
        assert!(configure_spec("no-equals-sign").is_err());
    }

    #[test]
    fn configured_points_fire_and_can_be_cleared() {
        declare("faults.test.fire", "test point");
        configure_spec("faults.test.fire=1*return(x)->off").unwrap();
        let eval = || -> Option<String> {
            fault_point!("faults.test.fire", |arg: Option<String>| arg);
            None
        };
        assert_eq!(eval(), Some("x".into()));
        assert_eq!(eval(), None, "only once");
        assert!(list()
            .iter()
            .any(|p| p.name == "faults.test.fire" && p.actions.is_some()));
        clear("faults.test.fire");
        assert!(list()
            .iter()
            .any(|p| p.name == "faults.test.fire" && p.actions.is_none()));
    }
}
