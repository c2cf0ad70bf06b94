//! libvirt URIs fit for logs and messages: [`redact_uri`] takes the
//! credentials out of a URI, [`scrub`] takes the same secrets out of a
//! message of libvirt's that may quote it. Credentials are never printed.

/// A libvirt URI fit for logs: no user or password, and no query parameter
/// that may carry a secret (`password`, `auth...`, `key...`, `token`...).
pub fn redact_uri(uri: &str) -> String {
    let (head, query) = match uri.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (uri, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => head.to_string(),
    };
    if let Some(q) = query {
        let kept: Vec<&str> = q
            .split('&')
            .filter(|p| !p.is_empty() && !secret_param(p))
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
    }
    out
}

/// libvirt's own messages may quote the URI they were given ("no
/// connection driver available for URI", with its query): take out of
/// `message` what [`redact_uri`] takes out of `uri` — the credentials and
/// the values of secret-looking query parameters.
pub fn scrub(message: &str, uri: &str) -> String {
    let mut out = message.replace(uri, &redact_uri(uri));
    let (head, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut secrets: Vec<&str> = Vec::new();
    for param in query.split('&').filter(|p| secret_param(p)) {
        if let Some((key, value)) = param.split_once('=').filter(|(_, v)| !v.is_empty()) {
            out = out.replace(param, &format!("{key}=***"));
            secrets.push(value);
        }
    }
    if let Some((userinfo, _)) = head
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next()?.rsplit_once('@'))
    {
        out = out.replace(&format!("{userinfo}@"), "");
        secrets.extend(
            userinfo
                .split_once(':')
                .map(|(_, password)| password)
                .filter(|p| !p.is_empty()),
        );
    }
    // Anywhere else (decoded, quoted...): a value long enough not to mangle
    // the rest of the message.
    for s in secrets.into_iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "***");
    }
    out
}

fn secret_param(param: &str) -> bool {
    let key = param.split('=').next().unwrap_or("").to_ascii_lowercase();
    [
        "pass", "pwd", "auth", "key", "token", "secret", "cred", "cert", "user",
    ]
    .iter()
    .any(|s| key.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::libvirt::LibvirtBackend;
    use crate::backend::Backend;

    #[test]
    fn redacts_credentials_from_uris() {
        assert_eq!(redact_uri("qemu:///system"), "qemu:///system");
        assert_eq!(redact_uri("test:///default"), "test:///default");
        assert_eq!(
            redact_uri("qemu+ssh://root:hunter2@host.example:2222/system"),
            "qemu+ssh://host.example:2222/system"
        );
        assert_eq!(
            redact_uri("qemu+tcp://admin@10.0.0.1/system?no_verify=1&authfile=/x&password=s3cret&keyfile=/k"),
            "qemu+tcp://10.0.0.1/system?no_verify=1"
        );
        assert_eq!(
            redact_uri("esx://u:p@h/?transport=https&passwd=x"),
            "esx://h/?transport=https"
        );
        assert!(!LibvirtBackend::new("qemu+ssh://u:hunter2@h/system?auth=x")
            .describe()
            .contains("hunter2"));
    }

    #[test]
    fn scrubs_credentials_from_libvirts_messages() {
        // libvirt 11.3 quotes the URI's query in this one.
        let uri = "xyz://admin:hunter2@h/?password=s3cret&no_verify=1";
        let msg = "no connection driver available for xyz://h/?password=s3cret&no_verify=1";
        assert_eq!(
            scrub(msg, uri),
            "no connection driver available for xyz://h/?password=***&no_verify=1"
        );
        let msg = format!("cannot open {uri}: admin:hunter2@h refused; token s3cret; hunter2");
        let s = scrub(&msg, uri);
        assert!(!s.contains("hunter2") && !s.contains("s3cret"), "{s}");
        assert!(
            s.starts_with("cannot open xyz://h/?no_verify=1: h refused"),
            "{s}"
        );
        // Nothing to take out: the message is left alone.
        assert_eq!(
            scrub("Connection refused", "qemu:///system"),
            "Connection refused"
        );
        // A short value is taken out where it is a parameter, not elsewhere.
        assert_eq!(
            scrub("bad key=ab in abc", "x:///?key=ab"),
            "bad key=*** in abc"
        );
    }
}
