//! The wire protocol (version 1): one JSON request line, one JSON response
//! line, typed with serde.

use serde::{Deserialize, Serialize};

use super::VERSION;
use crate::status::Snapshot;

/// One request, as sent on the wire (`{"v":1,"cmd":"...",...}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    Status,
    /// Re-read the config and roll every worker (SIGHUP); `wait`: answer when the rollout ends.
    /// With `slot`: replace only that slot's worker, start-before-stop, with
    /// its own generation (no config is read); answered when the new worker
    /// is ready, or with why it failed.
    Restart {
        #[serde(default)]
        wait: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<u32>,
    },
    /// Answers once the event loop answers (a liveness probe).
    Live,
    /// `ok` when every slot has a ready worker of the current generation and
    /// holdfast is not stopping; else `failed` with the reason (a readiness probe).
    Ready,
    /// Reopen the log files (SIGUSR1); answers when they are reopened.
    ReopenLogs,
    Scale {
        workers: u32,
    },
    /// Graceful stop; `wait`: answer when every worker has exited, then
    /// close the connection when holdfast exits.
    Stop {
        #[serde(default)]
        wait: bool,
    },
    /// Upgrade holdfast in place: exec `binary` (absolute; default: the one
    /// holdfast was started from) in the same pid, workers untouched.
    /// `wait`: answer from the new image once it has adopted everything.
    Upgrade {
        #[serde(default)]
        wait: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, unknown command, wrong version, too long, too slow.
    BadRequest,
    /// The peer's uid is neither holdfast's nor root's.
    Permission,
    /// holdfast refused or could not do it (rollout failed, config invalid...).
    Failed,
    /// Too many control connections at once.
    Busy,
    /// holdfast is exiting and its loop no longer answers.
    Unavailable,
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Snapshot>>,
    /// holdfast's pid, on `stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            v: VERSION,
            ok: true,
            message: Some(message.into()),
            kind: None,
            error: None,
            status: None,
            pid: None,
        }
    }
    pub fn err(kind: ErrorKind, error: impl Into<String>) -> Response {
        Response {
            v: VERSION,
            ok: false,
            message: None,
            kind: Some(kind),
            error: Some(error.into()),
            status: None,
            pid: None,
        }
    }
    pub(super) fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(
                r#"{{"v":1,"ok":false,"kind":"failed","error":"cannot encode the response: {e}"}}"#
            )
            .into_bytes()
        });
        v.push(b'\n');
        v
    }
}

/// Parses one request line; the error is the response to send.
pub fn parse_request(line: &[u8]) -> Result<Command, Response> {
    let bad = |m: String| Response::err(ErrorKind::BadRequest, m);
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        bad(format!(
            "not a JSON request line ({e}); send e.g. {{\"v\":1,\"cmd\":\"status\"}}"
        ))
    })?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(bad(format!(
                "unsupported protocol version {v}; this holdfast speaks {VERSION}"
            )))
        }
        None => return Err(bad(format!("missing \"v\": {VERSION}"))),
    }
    serde_json::from_value::<Request>(value)
        .map(|r| r.command)
        .map_err(|e| {
            bad(format!(
                "bad request: {e} (commands: status, restart, reopen-logs, scale, stop, upgrade, live, ready)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_round_trip() {
        let cases = [
            (r#"{"v":1,"cmd":"status"}"#, Command::Status),
            (
                r#"{"v":1,"cmd":"restart"}"#,
                Command::Restart {
                    wait: false,
                    slot: None,
                },
            ),
            (
                r#"{"v":1,"cmd":"restart","wait":true}"#,
                Command::Restart {
                    wait: true,
                    slot: None,
                },
            ),
            (
                r#"{"v":1,"cmd":"restart","slot":2}"#,
                Command::Restart {
                    wait: false,
                    slot: Some(2),
                },
            ),
            (r#"{"v":1,"cmd":"live"}"#, Command::Live),
            (r#"{"v":1,"cmd":"ready"}"#, Command::Ready),
            (r#"{"v":1,"cmd":"reopen-logs"}"#, Command::ReopenLogs),
            (
                r#"{"v":1,"cmd":"scale","workers":3}"#,
                Command::Scale { workers: 3 },
            ),
            (
                r#"{"cmd":"stop","v":1,"wait":true}"#,
                Command::Stop { wait: true },
            ),
            (
                r#"{"v":1,"cmd":"upgrade"}"#,
                Command::Upgrade {
                    wait: false,
                    binary: None,
                },
            ),
            (
                r#"{"v":1,"cmd":"upgrade","wait":true,"binary":"/usr/bin/holdfast"}"#,
                Command::Upgrade {
                    wait: true,
                    binary: Some("/usr/bin/holdfast".into()),
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_request(line.as_bytes()), Ok(want.clone()), "{line}");
            let sent = serde_json::to_vec(&Request {
                v: VERSION,
                command: want.clone(),
            })
            .expect("encode");
            assert_eq!(parse_request(&sent), Ok(want));
        }
    }

    #[test]
    fn bad_requests_say_why() {
        let cases = [
            ("garbage", "not a JSON request line"),
            (r#"{"cmd":"status"}"#, "missing \"v\""),
            (
                r#"{"v":2,"cmd":"status"}"#,
                "unsupported protocol version 2",
            ),
            (r#"{"v":1,"cmd":"explode"}"#, "unknown variant"),
            (r#"{"v":1,"cmd":"scale"}"#, "missing field `workers`"),
            (r#"[1,2]"#, "missing \"v\""),
        ];
        for (line, want) in cases {
            let r = parse_request(line.as_bytes()).expect_err(line);
            assert_eq!(r.kind, Some(ErrorKind::BadRequest), "{line}");
            let e = r.error.unwrap_or_default();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
