//! X-Matrix request authentication: signing our outbound requests and checking the
//! `Authorization: X-Matrix ...` header of inbound ones.
//!
//! The signed object is `{method, uri, origin, destination, content}` in canonical JSON; the
//! header carries the origin's signature over it.
//!
//! [Request authentication](https://spec.matrix.org/v1.16/server-server-api/#request-authentication)

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use ruma::{
    CanonicalJsonValue, OwnedServerName, ServerName, SigningKeyAlgorithm,
    signatures::verify_canonical_json_bytes,
};
use serde::Serialize;

use crate::{Error, ServerSigningKey};

/// The parameters of an `Authorization: X-Matrix` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XMatrix {
    /// The server that sent (and signed) the request.
    pub origin: OwnedServerName,
    /// The server the request is for; older servers leave it out.
    pub destination: Option<OwnedServerName>,
    /// The id of the signing key, `ed25519:<version>`.
    pub key_id: String,
    /// The signature, unpadded base64.
    pub signature: String,
}

/// The largest header value accepted, so a hostile peer cannot make us parse megabytes.
const HEADER_MAX_BYTES: usize = 8192;

impl XMatrix {
    /// Parses the header value, `X-Matrix origin=...,destination=...,key="...",sig="..."`.
    /// Parameter names are case-insensitive; values may be quoted; unknown ones are ignored.
    pub fn parse(header: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::MalformedAuthorization(reason.to_owned());
        if header.len() > HEADER_MAX_BYTES {
            return Err(bad("header too long"));
        }
        let (scheme, parameters) =
            header.trim().split_once(' ').ok_or_else(|| bad("expected X-Matrix parameters"))?;
        if !scheme.eq_ignore_ascii_case("X-Matrix") {
            return Err(bad("the scheme is not X-Matrix"));
        }
        let (mut origin, mut destination, mut key_id, mut signature) = (None, None, None, None);
        for (name, value) in split_parameters(parameters)? {
            let slot = match name.to_ascii_lowercase().as_str() {
                "origin" => &mut origin,
                "destination" => &mut destination,
                "key" => &mut key_id,
                "sig" => &mut signature,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(bad("a parameter appears twice"));
            }
        }
        let origin = origin.ok_or_else(|| bad("missing origin"))?;
        let origin = ServerName::parse(&origin).map_err(|_| bad("origin is not a server name"))?;
        let destination = destination
            .map(|destination| {
                ServerName::parse(&destination).map_err(|_| bad("destination is not a server name"))
            })
            .transpose()?;
        let key_id = key_id.ok_or_else(|| bad("missing key"))?;
        if !key_id.starts_with("ed25519:") || key_id.len() <= "ed25519:".len() {
            return Err(bad("key is not an ed25519 key id"));
        }
        let signature = signature.ok_or_else(|| bad("missing sig"))?;
        Ok(Self { origin, destination, key_id, signature })
    }

    /// The header value.
    pub fn to_header_value(&self) -> String {
        let quote = |text: &str| text.replace('\\', "\\\\").replace('"', "\\\"");
        let mut value = format!("X-Matrix origin=\"{}\"", self.origin);
        if let Some(destination) = &self.destination {
            value.push_str(&format!(",destination=\"{destination}\""));
        }
        value.push_str(&format!(
            ",key=\"{}\",sig=\"{}\"",
            quote(&self.key_id),
            quote(&self.signature)
        ));
        value
    }
}

/// Splits `a=b, c="d\"e"` into pairs, unquoting quoted values.
fn split_parameters(text: &str) -> Result<Vec<(String, String)>, Error> {
    let bad = |reason: &str| Error::MalformedAuthorization(reason.to_owned());
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut name = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            name.push(c);
        }
        let name = name.trim().to_owned();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '"') {
            return Err(bad("bad parameter name"));
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.push(chars.next().ok_or_else(|| bad("dangling escape"))?),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(bad("unterminated quoted value"));
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek().is_some_and(|c| *c != ',') {
                return Err(bad("text after a quoted value"));
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        if value.is_empty() {
            return Err(bad("empty parameter value"));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// What an X-Matrix signature covers, `{method, uri, origin, destination, content}`,
/// borrowed: serialised in key order, it is the object's canonical JSON (nothing in it is
/// `signatures` or `unsigned`, which signing strips), without copying the body.
#[derive(Serialize)]
struct Signed<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a CanonicalJsonValue>,
    destination: &'a str,
    method: &'a str,
    origin: &'a str,
    uri: &'a str,
}

/// The canonical JSON that an X-Matrix signature signs.
pub fn signing_text(
    method: &str,
    uri: &str,
    origin: &ServerName,
    destination: &ServerName,
    content: Option<&CanonicalJsonValue>,
) -> Result<String, Error> {
    let signed =
        Signed { content, destination: destination.as_str(), method, origin: origin.as_str(), uri };
    Ok(serde_json::to_string(&signed).map_err(ruma::signatures::JsonError::from)?)
}

/// Signs a request of ours: the `Authorization` header value for `method uri` to
/// `destination`. `uri` is the path with its query string, as sent.
pub fn sign_request(
    signing_key: &ServerSigningKey,
    destination: &ServerName,
    method: &str,
    uri: &str,
    content: Option<&CanonicalJsonValue>,
) -> Result<String, Error> {
    let canonical = signing_text(method, uri, signing_key.server_name(), destination, content)?;
    let header = XMatrix {
        origin: signing_key.server_name().clone(),
        destination: Some(destination.to_owned()),
        key_id: signing_key.key_id(),
        signature: signing_key.sign_bytes(canonical.as_bytes()),
    };
    Ok(header.to_header_value())
}

/// Parses a request body for signature checking: `None` for an empty body, else its JSON as
/// canonical JSON (a body that is not canonical JSON cannot carry a valid signature).
pub fn request_content(body: &[u8]) -> Result<Option<CanonicalJsonValue>, Error> {
    if body.is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| Error::MalformedAuthorization("the body is not JSON".into()))?;
    let value = CanonicalJsonValue::try_from(value)
        .map_err(|_| Error::MalformedAuthorization("the body is not canonical JSON".into()))?;
    Ok(Some(value))
}

/// Checks an inbound request's X-Matrix header against the origin's public key (raw bytes).
/// `our_name` is this server: a header naming another destination is refused.
pub fn verify_request(
    header: &XMatrix,
    our_name: &ServerName,
    method: &str,
    uri: &str,
    content: Option<&CanonicalJsonValue>,
    public_key: &[u8],
) -> Result<(), Error> {
    check_destination(header, our_name)?;
    let canonical = signing_text(method, uri, &header.origin, our_name, content)?;
    let invalid = || Error::InvalidSignature {
        server_name: header.origin.clone(),
        key_id: header.key_id.clone(),
    };
    let signature =
        STANDARD_NO_PAD.decode(header.signature.trim_end_matches('=')).map_err(|_| invalid())?;
    verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        public_key,
        &signature,
        canonical.as_bytes(),
    )
    .map_err(|_| invalid())
}

/// Refuses a header whose destination is another server.
pub fn check_destination(header: &XMatrix, our_name: &ServerName) -> Result<(), Error> {
    match &header.destination {
        Some(destination) if destination != our_name => {
            Err(Error::WrongDestination { destination: destination.to_string() })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use ruma::{CanonicalJsonObject, canonical_json::to_canonical_value, server_name};
    use serde_json::json;

    use super::*;

    fn key(dir: &tempfile::TempDir, name: &str) -> ServerSigningKey {
        ServerSigningKey::load_or_generate(&dir.path().join(name), ServerName::parse(name).unwrap())
            .unwrap()
    }

    fn public(key: &ServerSigningKey) -> Vec<u8> {
        STANDARD_NO_PAD.decode(key.public_key_base64()).unwrap()
    }

    /// Signs a request from `a.test` to `b.test` and verifies it as `verifier` would.
    fn check(
        tamper: impl FnOnce(&mut XMatrix, &mut Option<CanonicalJsonValue>, &mut String),
        verifier_key: Option<&ServerSigningKey>,
    ) -> Result<(), Error> {
        let dir = tempfile::tempdir().unwrap();
        let origin = key(&dir, "a.test");
        let content = Some(to_canonical_value(json!({"pdus": [], "edus": [{"x": 1}]})).unwrap());
        let uri = "/_matrix/federation/v1/send/t1?x=1".to_owned();
        let value =
            sign_request(&origin, server_name!("b.test"), "PUT", &uri, content.as_ref()).unwrap();
        let mut header = XMatrix::parse(&value).unwrap();
        let (mut content, mut uri) = (content, uri);
        tamper(&mut header, &mut content, &mut uri);
        let public_key = public(verifier_key.unwrap_or(&origin));
        verify_request(&header, server_name!("b.test"), "PUT", &uri, content.as_ref(), &public_key)
    }

    /// The signed object built as an object, to check [`signing_text`] against ruma.
    fn request_object(
        method: &str,
        uri: &str,
        origin: &ServerName,
        destination: &ServerName,
        content: Option<&CanonicalJsonValue>,
    ) -> CanonicalJsonObject {
        let mut object = CanonicalJsonObject::new();
        object.insert("method".into(), CanonicalJsonValue::String(method.to_owned()));
        object.insert("uri".into(), CanonicalJsonValue::String(uri.to_owned()));
        object.insert("origin".into(), CanonicalJsonValue::String(origin.to_string()));
        object.insert("destination".into(), CanonicalJsonValue::String(destination.to_string()));
        if let Some(content) = content {
            object.insert("content".into(), content.clone());
        }
        object
    }

    #[test]
    fn the_signing_text_is_the_request_objects_canonical_json() {
        let contents = [
            None,
            Some(json!({})),
            Some(json!({
                "pdus": [{"content": {"body": "h\u{e9}llo \"q\" \\ \n\t\u{1}\u{1f600}", "n": -3}}],
                "edus": [],
                "origin": "a.test",
                "z": {"b": [1, 2, {"unsigned": 1, "signatures": {}}], "a": null, "c": true},
            })),
        ];
        for content in contents {
            let content = content.map(|value| to_canonical_value(value).unwrap());
            let (origin, destination) = (server_name!("a.test"), server_name!("b.test"));
            let object = request_object("PUT", "/x?y=1", origin, destination, content.as_ref());
            let expected = ruma::signatures::to_canonical_json_string_for_signing(&object).unwrap();
            let text = signing_text("PUT", "/x?y=1", origin, destination, content.as_ref());
            assert_eq!(text.unwrap(), expected);
        }
    }

    #[test]
    fn a_good_signature_verifies() {
        check(|_, _, _| {}, None).unwrap();
    }

    #[test]
    fn a_wrong_destination_is_refused() {
        let error =
            check(|header, _, _| header.destination = Some("c.test".try_into().unwrap()), None);
        assert!(matches!(error, Err(Error::WrongDestination { .. })), "{error:?}");
    }

    #[test]
    fn a_tampered_body_or_uri_fails() {
        let error = check(
            |_, content, _| *content = Some(to_canonical_value(json!({"pdus": [1]})).unwrap()),
            None,
        );
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
        let error = check(|_, content, _| *content = None, None);
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
        let error = check(|_, _, uri| uri.push('2'), None);
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
    }

    #[test]
    fn another_key_or_origin_fails() {
        let dir = tempfile::tempdir().unwrap();
        let stranger = key(&dir, "a.test");
        let error = check(|_, _, _| {}, Some(&stranger));
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
        let error = check(|header, _, _| header.origin = "evil.test".try_into().unwrap(), None);
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
        let error = check(|header, _, _| header.signature = "not base64!".into(), None);
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
    }

    #[test]
    fn headers_parse_as_the_spec_shows() {
        let header = XMatrix::parse(
            "X-Matrix origin=\"origin.hs.example.com\",destination=\"destination.hs.example.com\",key=\"ed25519:key1\",sig=\"ABCDEF\"",
        )
        .unwrap();
        assert_eq!(header.origin.as_str(), "origin.hs.example.com");
        assert_eq!(header.destination.as_ref().unwrap().as_str(), "destination.hs.example.com");
        assert_eq!(header.key_id, "ed25519:key1");
        assert_eq!(header.signature, "ABCDEF");
        // Unquoted values, other case, spaces, unknown parameters, no destination.
        let header =
            XMatrix::parse("x-matrix ORIGIN=a.test:8448, Key=ed25519:k, sig=\"s\\\"x\", extra=1")
                .unwrap();
        assert_eq!(header.origin.as_str(), "a.test:8448");
        assert_eq!(header.destination, None);
        assert_eq!(header.signature, "s\"x");
        assert_eq!(XMatrix::parse(&header.to_header_value()).unwrap(), header);
    }

    #[test]
    fn malformed_headers_are_errors() {
        for header in [
            "",
            "Bearer abc",
            "X-Matrix",
            "X-Matrix origin=a.test,key=ed25519:k",
            "X-Matrix key=ed25519:k,sig=s",
            "X-Matrix origin=a.test,sig=s",
            "X-Matrix origin=\"a.test,key=ed25519:k,sig=s",
            "X-Matrix origin=a.test,origin=b.test,key=ed25519:k,sig=s",
            "X-Matrix origin=not a server,key=ed25519:k,sig=s",
            "X-Matrix origin=a.test,key=rsa:k,sig=s",
            "X-Matrix origin=a.test,key=ed25519:k,sig=",
            "X-Matrix origin=\"a.test\"junk,key=ed25519:k,sig=s",
        ] {
            assert!(
                matches!(XMatrix::parse(header), Err(Error::MalformedAuthorization(_))),
                "{header:?}"
            );
        }
        let long = format!("X-Matrix origin=a.test,key=ed25519:k,sig={}", "a".repeat(9000));
        assert!(XMatrix::parse(&long).is_err());
    }

    #[test]
    fn request_bodies_must_be_canonical_json() {
        assert_eq!(request_content(b"").unwrap(), None);
        assert!(request_content(b"{\"a\": 1}").unwrap().is_some());
        assert!(request_content(b"{\"a\": 1.5}").is_err());
        assert!(request_content(b"not json").is_err());
    }
}
