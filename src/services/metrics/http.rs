//! The little HTTP/1.1 the `metrics` service speaks (RFC 9110, RFC 9112): one request head,
//! read whole and bounded, one answer, then the connection closes.
//!
//! Pure: bytes in, a [`Request`] out, and the bytes of an answer; no I/O, so every case is
//! unit-tested. Only what a scraper sends is accepted: `GET` or `HEAD` of [`PATH`] in
//! origin form, HTTP/1.0 or HTTP/1.1 (with `Host`, RFC 9112 §3.2). A request body is not
//! read (the connection closes after the answer, and the worker's lingering close drains it).

/// The one path served (a query string is allowed and ignored).
pub const PATH: &str = "/metrics";

/// Longest request head, in bytes: request line and header fields, up to the empty line.
/// A scraper sends a few hundred.
pub const MAX_REQUEST: usize = 8192;

/// What a complete (or hopeless) request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `GET` (or `HEAD`: `head`) of [`PATH`]; `openmetrics` when the `Accept` field prefers
    /// the OpenMetrics text format to the Prometheus text format 0.0.4.
    Metrics {
        /// `HEAD`: the answer's head only.
        head: bool,
        /// Answer in OpenMetrics 1.0.0 rather than text 0.0.4.
        openmetrics: bool,
    },
    /// Another path: 404.
    NotFound,
    /// Another method on [`PATH`]: 405.
    MethodNotAllowed,
    /// Not an HTTP/1.x request head: 400.
    Malformed,
    /// HTTP of another major version: 505.
    VersionNotSupported,
    /// No end of the head within [`MAX_REQUEST`] bytes: 431.
    TooLarge,
}

/// Reads what has arrived: `None` while the head may still be coming.
pub fn parse(input: &[u8]) -> Option<Request> {
    let end = head_end(input);
    let Some(end) = end else {
        if input.len() >= MAX_REQUEST {
            return Some(Request::TooLarge);
        }
        // A request line already known to be garbage is answered at once.
        let line_end = input.iter().position(|&b| b == b'\n')?;
        return request_line(trim_cr(&input[..line_end])).err();
    };
    let head = &input[..end];
    let mut lines = head.split(|&b| b == b'\n').map(trim_cr);
    let (method, target, http11) = match request_line(lines.next().unwrap_or_default()) {
        Ok(line) => line,
        Err(request) => return Some(request),
    };
    let mut host = false;
    let mut openmetrics = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = field(line) else { return Some(Request::Malformed) };
        if name.eq_ignore_ascii_case(b"host") {
            host = true;
        } else if name.eq_ignore_ascii_case(b"accept") {
            openmetrics = prefers_openmetrics(value);
        }
    }
    if http11 && !host {
        return Some(Request::Malformed);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    Some(if path != PATH.as_bytes() {
        Request::NotFound
    } else if method == b"GET" || method == b"HEAD" {
        Request::Metrics { head: method == b"HEAD", openmetrics }
    } else {
        Request::MethodNotAllowed
    })
}

/// Where the head ends (the index just before its empty line), if it has.
fn head_end(input: &[u8]) -> Option<usize> {
    let mut start = 0;
    for (i, &b) in input.iter().enumerate() {
        if b == b'\n' {
            if trim_cr(&input[start..i]).is_empty() {
                return Some(start);
            }
            start = i + 1;
        }
    }
    None
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `method SP target SP HTTP/1.x` (RFC 9112 §3): method, target and whether it is 1.1.
fn request_line(line: &[u8]) -> Result<(&[u8], &[u8], bool), Request> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Request::Malformed);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Request::Malformed);
    }
    if !target.starts_with(b"/") || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(Request::Malformed);
    }
    match version {
        b"HTTP/1.1" => Ok((method, target, true)),
        b"HTTP/1.0" => Ok((method, target, false)),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Err(Request::VersionNotSupported)
        }
        _ => Err(Request::Malformed),
    }
}

/// `name: value` (RFC 9112 §5.1: no whitespace before the colon, no line folding).
fn field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return None;
    }
    if value.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return None;
    }
    Some((name, value.trim_ascii()))
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether an `Accept` value ranks `application/openmetrics-text` above the text format
/// (RFC 9110 §12.5.1 weights; `text/plain`, `text/*` and `*/*` stand for the text format).
fn prefers_openmetrics(accept: &[u8]) -> bool {
    let accept = String::from_utf8_lossy(accept);
    let (mut openmetrics, mut text) = (0.0f64, 0.0f64);
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or_default().to_ascii_lowercase();
        let q = params
            .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
            .find_map(|q| q.parse::<f64>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics > text
}

/// An answer's head and body: `status` (with its reason phrase), the `Content-Type`, extra
/// header lines (each ending in CR LF), the body, and whether to send the body (not for
/// `HEAD`). The connection closes after it.
pub fn answer(status: &str, content_type: &str, extra: &str, body: &[u8], send_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if send_body {
        out.extend_from_slice(body);
    }
    out
}

/// The answer to a request that is not a scrape: a one-line plain-text body.
pub fn error(request: Request) -> Vec<u8> {
    let (status, extra) = match request {
        Request::NotFound => ("404 Not Found", ""),
        Request::MethodNotAllowed => ("405 Method Not Allowed", "Allow: GET, HEAD\r\n"),
        Request::VersionNotSupported => ("505 HTTP Version Not Supported", ""),
        Request::TooLarge => ("431 Request Header Fields Too Large", ""),
        Request::Malformed | Request::Metrics { .. } => ("400 Bad Request", ""),
    };
    let body = format!("{status}\n");
    answer(status, "text/plain; charset=utf-8", extra, body.as_bytes(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAccept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\r\n";

    #[test]
    fn a_scrape_is_recognised_with_its_format() {
        let open = Request::Metrics { head: false, openmetrics: true };
        assert_eq!(parse(SCRAPE.as_bytes()), Some(open), "Prometheus's own Accept");
        let plain = Request::Metrics { head: false, openmetrics: false };
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"), Some(plain));
        assert_eq!(parse(b"GET /metrics?x=1 HTTP/1.0\n\n"), Some(plain), "bare LF, 1.0, no Host");
        let head = Request::Metrics { head: true, openmetrics: false };
        assert_eq!(parse(b"HEAD /metrics HTTP/1.1\r\nhost: x\r\n\r\n"), Some(head));
        let refused = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;q=0\r\n\r\n";
        assert_eq!(parse(refused), Some(plain), "q=0 means not acceptable");
    }

    #[test]
    fn an_incomplete_head_waits_and_a_bounded_one_gives_up() {
        for cut in 0..SCRAPE.len() - 1 {
            assert_eq!(parse(&SCRAPE.as_bytes()[..cut]), None, "cut at {cut}");
        }
        let endless = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST));
        assert_eq!(parse(endless.as_bytes()), Some(Request::TooLarge));
    }

    #[test]
    fn other_paths_methods_versions_and_garbage_are_refused() {
        let cases: [(&[u8], Request); 9] = [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Request::NotFound),
            (b"GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n", Request::NotFound),
            (b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Request::MethodNotAllowed),
            (b"GET /metrics HTTP/2.0\r\n", Request::VersionNotSupported),
            (b"hello\r\n", Request::Malformed),
            (b"GET /metrics HTTP/1.1\r\n\r\n", Request::Malformed),
            (b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n", Request::Malformed),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", Request::Malformed),
            (b"GET  /metrics HTTP/1.1\r\n", Request::Malformed),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), Some(expected), "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn answers_carry_length_and_close() {
        let out = error(Request::MethodNotAllowed);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{text}");
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 23\r\n"), "{text}");
        assert!(text.ends_with("Connection: close\r\n\r\n405 Method Not Allowed\n"), "{text}");
        let head = answer("200 OK", "text/plain", "", b"abc", false);
        assert!(String::from_utf8(head).unwrap().ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"));
    }
}
