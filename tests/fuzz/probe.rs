//! The readiness probe's response parser (`parse_status`) and its read
//! (`once`): arbitrary bytes never panic and a status is only ever read from
//! a status line; every well-formed status line gives its code, as httparse
//! reads it; and over a real unix socket, a response written in any chunks
//! gives the same answer as the parser on its first bytes.

use std::io::{Read, Write};
use std::time::Duration;

use holdfast::fuzzing::{parse_status, probe_once};
use proptest::prelude::*;

use crate::support::{ensure, fuzz};

/// The first bytes of a response, as the probe reads them (at most 64).
fn head() -> impl Strategy<Value = Vec<u8>> {
    let arbitrary = prop::collection::vec(any::<u8>(), 0..64);
    let status_like = (
        prop::sample::select(vec![
            "HTTP/1.1",
            "HTTP/1.0",
            "HTTP/2",
            "HTTP/",
            "http/1.1",
            " HTTP/1.1",
            "HTTP/1.1\t",
        ]),
        prop::sample::select(vec![" ", "  ", "\t", "", "\r\n"]),
        prop_oneof![
            (0u32..1000).prop_map(|c| c.to_string()),
            "[0-9+-]{0,5}",
            Just("२००".to_string()),
        ],
        "[ -~]{0,20}",
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(v, sep, code, rest, tail)| {
            let mut b = format!("{v}{sep}{code}{rest}").into_bytes();
            b.extend(tail);
            b.truncate(64);
            b
        });
    prop_oneof![arbitrary, status_like]
}

#[test]
fn probe_status_arbitrary() {
    fuzz("probe_status_arbitrary", 5000, head(), |b| {
        let Ok(code) = parse_status(&b) else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&b);
        let mut words = text.split_whitespace();
        let (version, word) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        ensure((100..600).contains(&code), || format!("status {code}"))?;
        ensure(version.starts_with("HTTP/"), || {
            format!("{code} from {text:?}")
        })?;
        ensure(word == code.to_string(), || format!("{code} from {text:?}"))
    });
}

/// A well-formed response head: status line, headers, maybe a body.
fn response() -> impl Strategy<Value = (u16, Vec<u8>)> {
    (
        prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
        100u16..600,
        "[ -~]{0,30}",
        prop::collection::vec(("[A-Za-z-]{1,12}", "[ -~]{0,30}"), 0..4),
    )
        .prop_map(|(v, code, reason, headers)| {
            let mut r = format!("{v} {code} {reason}\r\n");
            for (k, val) in headers {
                r.push_str(&format!("{k}: {val}\r\n"));
            }
            r.push_str("\r\nbody");
            (code, r.into_bytes())
        })
}

#[test]
fn probe_status_agrees_with_httparse() {
    fuzz(
        "probe_status_agrees_with_httparse",
        3000,
        response(),
        |(code, r)| {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut parsed = httparse::Response::new(&mut headers);
            let oracle = parsed.parse(&r).ok().and(parsed.code);
            ensure(oracle == Some(code), || format!("httparse: {oracle:?}"))?;
            // The probe sees at most 64 bytes, and at least the 12 of the status line.
            for n in [12, 13, 20, 64] {
                let got = parse_status(&r[..n.min(r.len())]).ok();
                ensure(got == Some(code), || {
                    format!("{n} bytes: {got:?} != {code}")
                })?;
            }
            Ok(())
        },
    );
}

#[test]
fn probe_once_over_a_socket() {
    // What the worker answers: a well-formed response or any bytes, in
    // chunks of these sizes, then it closes.
    let answer = prop_oneof![
        response().prop_map(|(code, r)| (Some(code), r)),
        prop::collection::vec(any::<u8>(), 0..100).prop_map(|r| (None, r)),
    ];
    let chunks = prop::collection::vec(1usize..20, 1..8);
    let path = "/[!-~]{0,20}";
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    fuzz(
        "probe_once_over_a_socket",
        300,
        (answer, chunks, path),
        |((code, answer), chunks, path)| {
            let sock = dir.path().join("probe.sock");
            let _ = std::fs::remove_file(&sock);
            let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
            let sent = answer.clone();
            let server = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
                let (mut s, _) = listener.accept()?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut request = Vec::new();
                let mut buf = [0u8; 256];
                while !request.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf)? {
                        0 => break,
                        n => request.extend_from_slice(&buf[..n]),
                    }
                }
                let mut rest = &sent[..];
                for size in chunks.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (now, later) = rest.split_at((*size).min(rest.len()));
                    // The client may have read enough and closed: not an error here.
                    if s.write_all(now).is_err() {
                        break;
                    }
                    std::thread::yield_now();
                    rest = later;
                }
                Ok(request)
            });
            let got = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), probe_once(&sock, &path)).await
            });
            let request = server.join().expect("server thread").expect("server");
            let got = got.map_err(|_| {
                proptest::test_runner::TestCaseError::fail("the probe did not return within 10s")
            })?;
            let line = format!("GET {path} HTTP/1.0\r\n");
            ensure(request.starts_with(line.as_bytes()), || {
                format!("request {:?}", String::from_utf8_lossy(&request))
            })?;
            // The probe reads at least 12 bytes (or all there is) and at most 64.
            let wants: Vec<Option<u16>> = (answer.len().min(12)..=answer.len().min(64))
                .map(|n| parse_status(&answer[..n]).ok())
                .collect();
            let got = got.ok();
            ensure(wants.contains(&got), || {
                format!("{got:?}, not one of {wants:?}")
            })?;
            // A well-formed response's status is never missed.
            if code.is_some() {
                ensure(got == code, || format!("{got:?} != {code:?}"))?;
            }
            Ok(())
        },
    );
}
