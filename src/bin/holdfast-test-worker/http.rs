//! HTTP/1.x request heads (parsed by `httparse`) and responses: pure
//! functions, unit-tested without sockets.

use std::fmt;

use crate::{MAX_BODY_BYTES, MAX_HEADERS, MAX_HEAD_BYTES};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    Http10,
    Http11,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub(crate) method: String,
    /// The request target as sent (path and query).
    pub(crate) target: String,
    pub(crate) version: Version,
    /// Body length from `Content-Length` (0 if absent).
    pub(crate) content_length: u64,
    /// Whether the connection stays open after the answer, from the version
    /// and `Connection` header.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub(crate) expect_continue: bool,
}

impl Request {
    pub(crate) fn path(&self) -> &str {
        let path = self.target.split('?').next().unwrap_or_default();
        // Absolute form (`http://host/path`), as a proxy may send.
        match path.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |at| &rest[at..]),
            None => path,
        }
    }

    /// The value of query parameter `key`, undecoded.
    pub(crate) fn param(&self, key: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then_some(v)
        })
    }
}

/// Why a request head was refused; each maps to a status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParseError {
    HeadTooLarge,
    BodyTooLarge,
    Malformed(&'static str),
    UnsupportedVersion,
    TransferEncoding,
}

impl ParseError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            ParseError::HeadTooLarge => 431,
            ParseError::BodyTooLarge => 413,
            ParseError::Malformed(_) => 400,
            ParseError::UnsupportedVersion => 505,
            ParseError::TransferEncoding => 501,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::HeadTooLarge => write!(f, "request head over {MAX_HEAD_BYTES} bytes"),
            ParseError::BodyTooLarge => write!(f, "request body over {MAX_BODY_BYTES} bytes"),
            ParseError::Malformed(what) => write!(f, "bad request: {what}"),
            ParseError::UnsupportedVersion => write!(f, "only HTTP/1.0 and HTTP/1.1"),
            ParseError::TransferEncoding => write!(f, "Transfer-Encoding is not supported"),
        }
    }
}

/// Parses one request head from the start of `buf` with `httparse`: the
/// request line and headers up to the empty line (empty lines before the
/// request line are skipped, as RFC 9112 allows). Returns the request and the
/// number of bytes it took, or `None` if the head is not complete yet.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => {
            let start = buf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            return if buf.len() - start > MAX_HEAD_BYTES {
                Err(ParseError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::HeadTooLarge),
        Err(httparse::Error::Version) if names_other_version(buf) => {
            return Err(ParseError::UnsupportedVersion)
        }
        Err(e) => return Err(ParseError::Malformed(malformed(e))),
    };
    let start = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if used - start > MAX_HEAD_BYTES + 4 {
        return Err(ParseError::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(ParseError::Malformed("request line"));
    };
    let version = if minor == 1 {
        Version::Http11
    } else {
        Version::Http10
    };
    let mut content_length: Option<u64> = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| ParseError::Malformed("header value is not UTF-8"))?
            .trim_matches(|c| c == ' ' || c == '\t');
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = value
                .parse::<u64>()
                .map_err(|_| ParseError::Malformed("Content-Length"))?;
            if content_length.is_some_and(|old| old != len) {
                return Err(ParseError::Malformed("conflicting Content-Length"));
            }
            content_length = Some(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::TransferEncoding);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue |= value.eq_ignore_ascii_case("100-continue");
        }
    }
    let keep_alive = match version {
        Version::Http11 => !close,
        Version::Http10 => keep_alive && !close,
    };
    let request = Request {
        method: method.to_string(),
        target: target.to_string(),
        version,
        content_length: content_length.unwrap_or(0),
        keep_alive,
        expect_continue,
    };
    Ok(Some((request, used)))
}

/// Whether the request line's version is an `HTTP/` one other than 1.0 and
/// 1.1 (505), rather than garbage (400); httparse says `Version` for both.
fn names_other_version(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let line = buf[start..]
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    matches!(
        (words.next(), words.next(), words.next(), words.next()),
        (Some(_), Some(_), Some(v), None) if v.starts_with(b"HTTP/")
    )
}

/// What a refused head got wrong, in the words of the 400's body.
fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status | httparse::Error::Version => "version",
        httparse::Error::Token => "method or request target",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// An answer before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn text(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "text/plain",
            body: body.into_bytes(),
        }
    }

    /// The bytes on the wire. `head_only` for HEAD; `close` adds
    /// `Connection: close`; `http10_keep_alive` adds `Connection: keep-alive`
    /// when not closing (an HTTP/1.0 client asked for it).
    pub(crate) fn encode(&self, head_only: bool, close: bool, http10_keep_alive: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        let no_body = matches!(self.status, 204 | 304);
        if !no_body {
            out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        out.push_str(&format!("X-Pid: {}\r\n", std::process::id()));
        if close {
            out.push_str("Connection: close\r\n");
        } else if http10_keep_alive {
            out.push_str("Connection: keep-alive\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only && !no_body {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<(Request, usize)>, ParseError> {
        parse_head(raw.as_bytes())
    }

    fn request(raw: &str) -> Request {
        match parse(raw) {
            Ok(Some((req, used))) => {
                assert_eq!(used, raw.len(), "consumed the whole head of {raw:?}");
                req
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn simple_get_keeps_alive_on_http11() {
        let req = request("GET /?sleep=30 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(req.method, "GET");
        assert_eq!(req.path(), "/");
        assert_eq!(req.param("sleep"), Some("30"));
        assert_eq!(req.param("mb"), None);
        assert_eq!(req.version, Version::Http11);
        assert!(req.keep_alive);
        assert_eq!(req.content_length, 0);
    }

    #[test]
    fn connection_header_rules() {
        let table = [
            ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                "GET / HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n", true),
        ];
        for (raw, keep_alive) in table {
            assert_eq!(request(raw).keep_alive, keep_alive, "{raw:?}");
        }
    }

    #[test]
    fn incomplete_head_waits_for_more() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse("\r\n"), Ok(None));
    }

    #[test]
    fn post_body_length_and_pipelining() {
        let raw = "POST /x HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let Ok(Some((req, used))) = parse(raw) else {
            panic!("no request");
        };
        assert_eq!(req.content_length, 5);
        assert!(req.expect_continue);
        assert_eq!(&raw[used..used + 5], "hello");
        assert_eq!(request(&raw[used + 5..]).method, "GET");
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let req = request("\r\nGET /inherited HTTP/1.1\r\n\r\n");
        assert_eq!(req.path(), "/inherited");
    }

    #[test]
    fn absolute_form_target() {
        let req = request("GET http://h:1/status/503?sleep=1 HTTP/1.1\r\n\r\n");
        assert_eq!(req.path(), "/status/503");
        assert_eq!(req.param("sleep"), Some("1"));
    }

    #[test]
    fn refusals() {
        let table = [
            ("GET / HTTP/2.0\r\n\r\n", 505),
            ("GET / FOO\r\n\r\n", 400),
            ("GET /\r\n\r\n", 400),
            ("GET  / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        ];
        for (raw, status) in table {
            match parse(raw) {
                Err(e) => assert_eq!(e.status(), status, "{raw:?}"),
                other => panic!("{raw:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn head_size_is_bounded() {
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(&long), Err(ParseError::HeadTooLarge));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse(&many), Err(ParseError::HeadTooLarge));
    }

    #[test]
    fn response_encoding() {
        let resp = Response::text(200, "hi\n".into());
        let text = String::from_utf8(resp.encode(false, true, false)).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(
            text.contains(&format!("X-Pid: {}\r\n", std::process::id())),
            "{text}"
        );
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhi\n"), "{text}");
        let head = String::from_utf8(resp.encode(true, false, true)).unwrap_or_default();
        assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }
}
