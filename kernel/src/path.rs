//! Actor paths: the stable, human-readable names by which callers reach actors.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// A slash-separated path naming a node of the supervision tree, e.g. `llmos/devices/cpu:0`.
///
/// Paths outlive actor instances: a restarted child keeps its path, so callers that hold a
/// path (or an [`crate::Addr`] built from it) keep working across restarts.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorPath(Arc<str>);

impl ActorPath {
    /// The path of a root node.
    pub fn root(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The path of a child named `name` under this path.
    pub fn child(&self, name: &str) -> Self {
        Self(Arc::from(format!("{}/{}", self.0, name)))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment: the node's own name.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The parent path, if this is not a root.
    pub fn parent(&self) -> Option<ActorPath> {
        self.0
            .rsplit_once('/')
            .map(|(parent, _)| ActorPath(Arc::from(parent)))
    }
}

/// Checks that a child name can be a path segment: non-empty, no `/`, no whitespace.
pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a child name must not be empty".into());
    }
    if name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(format!(
            "child name `{name}` must not contain `/` or whitespace"
        ));
    }
    Ok(())
}

impl fmt::Display for ActorPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ActorPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for ActorPath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl From<&str> for ActorPath {
    fn from(value: &str) -> Self {
        Self(Arc::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_parent_and_name_round_trip() {
        let root = ActorPath::root("llmos");
        let leaf = root.child("devices").child("cpu:0");
        assert_eq!(leaf.as_str(), "llmos/devices/cpu:0");
        assert_eq!(leaf.name(), "cpu:0");
        assert_eq!(leaf.parent().unwrap().as_str(), "llmos/devices");
        assert_eq!(root.parent(), None);
    }

    #[test]
    fn names_with_separators_are_rejected() {
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("cpu:0").is_ok());
    }
}
