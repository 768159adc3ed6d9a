//! The wire format: one request line, one response line, both JSON.

use serde::{Deserialize, Serialize};

/// The longest request line accepted, newline included: a console command is short, and
/// a bound keeps a misbehaving client from growing the server's memory.
pub const MAX_LINE: usize = 64 * 1024;

/// One command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The command name (`tree`, `kill`, …).
    pub cmd: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

impl Request {
    /// A request from a command and its arguments.
    pub fn new(cmd: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            cmd: cmd.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// Parses a request line: a JSON object, or plain whitespace-separated words.
    pub fn parse(line: &str) -> Result<Request, String> {
        let line = line.trim();
        if line.starts_with('{') {
            return serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"));
        }
        let mut words = line.split_whitespace().map(str::to_string);
        match words.next() {
            Some(cmd) => Ok(Request {
                cmd,
                args: words.collect(),
            }),
            None => Err("empty request".into()),
        }
    }
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// Its output, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// What went wrong, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success with its text.
    pub fn ok(text: impl Into<String>) -> Self {
        Self {
            ok: true,
            text: Some(text.into()),
            error: None,
        }
    }

    /// A failure with its reason.
    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            text: None,
            error: Some(error.into()),
        }
    }

    /// The response as one line (newline included).
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"unencodable response"}"#.into());
        line.push('\n');
        line
    }

    /// `Ok(text)` or `Err(error)`.
    pub fn into_result(self) -> Result<String, String> {
        if self.ok {
            Ok(self.text.unwrap_or_default())
        } else {
            Err(self.error.unwrap_or_else(|| "unknown error".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_and_plain_words() {
        assert_eq!(
            Request::parse(r#"{"cmd":"kill","args":["llmos/journal"]}"#).unwrap(),
            Request::new("kill", ["llmos/journal"])
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"tree"}"#).unwrap(),
            Request::new("tree", Vec::<String>::new())
        );
        assert_eq!(
            Request::parse("  inject engine.step 1*panic->off \n").unwrap(),
            Request::new("inject", ["engine.step", "1*panic->off"])
        );
        assert!(Request::parse("").is_err());
        assert!(Request::parse("{not json").is_err());
    }

    #[test]
    fn responses_round_trip_as_one_line() {
        let line = Response::ok("a\nb").to_line();
        assert_eq!(line.matches('\n').count(), 1);
        let back: Response = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back.into_result(), Ok("a\nb".into()));
        assert_eq!(
            Response::err("nope").into_result(),
            Err::<String, _>("nope".into())
        );
    }
}
