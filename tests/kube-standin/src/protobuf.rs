//! Minimal decoder for the Kubernetes protobuf wire format, enough for what kubectl sends
//! as `application/vnd.kubernetes.protobuf`: a TokenRequest (`kubectl create token`), and
//! the name (plus pod `serviceAccountName`/`nodeName`) of a ServiceAccount or Pod.
//! The envelope is the 4-byte magic `k8s\0` followed by a `runtime.Unknown` whose `raw`
//! field holds the object. Responses are always JSON, which kubectl also accepts.

use crate::api::TokenRequestBody;
use crate::cluster::BoundObjectRef;

/// One protobuf field: number and value.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".to_string())
    }

    fn next(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let v = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                let start = self.pos;
                self.skip(len)?;
                Value::Bytes(&self.buf[start..start + len])
            }
            5 => {
                self.skip(4)?;
                Value::Fixed
            }
            t => return Err(format!("unsupported wire type {t}")),
        };
        Ok(Some((field, v)))
    }

    fn skip(&mut self, n: usize) -> Result<(), String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        if end > self.buf.len() {
            return Err("truncated field".to_string());
        }
        self.pos = end;
        Ok(())
    }
}

fn string(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in string field".to_string())
}

/// Strips the `k8s\0` magic and the `runtime.Unknown` envelope; returns `(kind, raw)`.
fn unwrap_envelope(body: &[u8]) -> Result<(String, &[u8]), String> {
    let inner = body
        .strip_prefix(b"k8s\0")
        .ok_or("missing k8s protobuf magic")?;
    let mut r = Reader::new(inner);
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    while let Some((f, v)) = r.next()? {
        match (f, v) {
            (1, Value::Bytes(tm)) => {
                let mut t = Reader::new(tm);
                while let Some((tf, tv)) = t.next()? {
                    if let (2, Value::Bytes(k)) = (tf, tv) {
                        kind = string(k)?;
                    }
                }
            }
            (2, Value::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    Ok((kind, raw))
}

/// `ObjectMeta`: name (1) and namespace (3).
fn object_meta(b: &[u8]) -> Result<(Option<String>, Option<String>), String> {
    let mut r = Reader::new(b);
    let (mut name, mut ns) = (None, None);
    while let Some((f, v)) = r.next()? {
        match (f, v) {
            (1, Value::Bytes(s)) => name = Some(string(s)?),
            (3, Value::Bytes(s)) => ns = Some(string(s)?),
            _ => {}
        }
    }
    Ok((name, ns))
}

/// Decodes a protobuf `TokenRequest` body.
pub fn decode_token_request(body: &[u8]) -> Result<TokenRequestBody, String> {
    let (kind, raw) = unwrap_envelope(body)?;
    if !kind.is_empty() && kind != "TokenRequest" {
        return Err(format!("expected kind TokenRequest, got {kind}"));
    }
    let mut out = TokenRequestBody::default();
    let mut r = Reader::new(raw);
    while let Some((f, v)) = r.next()? {
        match (f, v) {
            (1, Value::Bytes(m)) => {
                let (name, ns) = object_meta(m)?;
                out.name = name;
                out.namespace = ns;
            }
            (2, Value::Bytes(spec)) => {
                let mut s = Reader::new(spec);
                while let Some((sf, sv)) = s.next()? {
                    match (sf, sv) {
                        (1, Value::Bytes(a)) => out.audiences.push(string(a)?),
                        (4, Value::Varint(n)) => out.expiration_seconds = Some(n as i64),
                        (3, Value::Bytes(b)) => {
                            let mut br = BoundObjectRef::default();
                            let mut rr = Reader::new(b);
                            while let Some((bf, bv)) = rr.next()? {
                                if let Value::Bytes(x) = bv {
                                    let x = string(x)?;
                                    match bf {
                                        1 => br.kind = x,
                                        2 => br.api_version = x,
                                        3 => br.name = x,
                                        4 => br.uid = x,
                                        _ => {}
                                    }
                                }
                            }
                            out.bound = Some(br);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The parts of a protobuf ServiceAccount or Pod the stand-in keeps.
#[derive(Debug, Default)]
pub struct ObjectBody {
    /// `metadata.name`.
    pub name: Option<String>,
    /// Pod `spec.serviceAccountName` (field 8).
    pub service_account_name: Option<String>,
    /// Pod `spec.nodeName` (field 10).
    pub node_name: Option<String>,
    /// Pod `spec.terminationGracePeriodSeconds` (field 4).
    pub termination_grace_seconds: Option<i64>,
}

/// Decodes a protobuf ServiceAccount or Pod body.
pub fn decode_object(body: &[u8]) -> Result<ObjectBody, String> {
    let (_kind, raw) = unwrap_envelope(body)?;
    let mut out = ObjectBody::default();
    let mut r = Reader::new(raw);
    while let Some((f, v)) = r.next()? {
        match (f, v) {
            (1, Value::Bytes(m)) => out.name = object_meta(m)?.0,
            (2, Value::Bytes(spec)) => {
                let mut s = Reader::new(spec);
                while let Some((sf, sv)) = s.next()? {
                    match (sf, sv) {
                        (8, Value::Bytes(x)) => out.service_account_name = Some(string(x)?),
                        (10, Value::Bytes(x)) => out.node_name = Some(string(x)?),
                        (4, Value::Varint(x)) => out.termination_grace_seconds = Some(x as i64),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn strings_map(
    b: &[u8],
    into: &mut std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let mut r = Reader::new(b);
    let (mut k, mut v) = (String::new(), String::new());
    while let Some((f, val)) = r.next()? {
        match (f, val) {
            (1, Value::Bytes(x)) => k = string(x)?,
            (2, Value::Bytes(x)) => v = string(x)?,
            _ => {}
        }
    }
    into.insert(k, v);
    Ok(())
}

/// `ObjectMeta` of an RBAC object: name (1), namespace (3), labels (11), annotations (12).
fn rbac_meta(b: &[u8]) -> Result<crate::rbac::ObjectMeta, String> {
    let mut m = crate::rbac::ObjectMeta::default();
    let mut r = Reader::new(b);
    while let Some((f, v)) = r.next()? {
        match (f, v) {
            (1, Value::Bytes(s)) => m.name = string(s)?,
            (3, Value::Bytes(s)) => m.namespace = string(s)?,
            (11, Value::Bytes(e)) => strings_map(e, &mut m.labels)?,
            (12, Value::Bytes(e)) => strings_map(e, &mut m.annotations)?,
            _ => {}
        }
    }
    Ok(m)
}

/// Decodes a protobuf Role, ClusterRole, RoleBinding or ClusterRoleBinding
/// (`k8s.io/api/rbac/v1/generated.proto`), as `kubectl create role|rolebinding|...` sends.
pub fn decode_rbac(body: &[u8], kind: crate::rbac::Kind) -> Result<crate::rbac::Object, String> {
    use crate::rbac::{
        AggregationRule, Binding, Kind, LabelSelector, Object, PolicyRule, Role, Subject,
    };
    let (got, raw) = unwrap_envelope(body)?;
    if !got.is_empty() && got != kind.kind() {
        return Err(format!("expected kind {}, got {got}", kind.kind()));
    }
    let mut r = Reader::new(raw);
    match kind {
        Kind::Role | Kind::ClusterRole => {
            let mut role = Role::default();
            while let Some((f, v)) = r.next()? {
                match (f, v) {
                    (1, Value::Bytes(m)) => role.metadata = rbac_meta(m)?,
                    (2, Value::Bytes(rule)) => {
                        let mut pr = PolicyRule::default();
                        let mut rr = Reader::new(rule);
                        while let Some((rf, rv)) = rr.next()? {
                            if let Value::Bytes(x) = rv {
                                let x = string(x)?;
                                match rf {
                                    1 => pr.verbs.push(x),
                                    2 => pr.api_groups.push(x),
                                    3 => pr.resources.push(x),
                                    4 => pr.resource_names.push(x),
                                    5 => pr.non_resource_urls.push(x),
                                    _ => {}
                                }
                            }
                        }
                        role.rules.push(pr);
                    }
                    (3, Value::Bytes(agg)) => {
                        let mut rule = AggregationRule::default();
                        let mut ar = Reader::new(agg);
                        while let Some((af, av)) = ar.next()? {
                            if let (1, Value::Bytes(sel)) = (af, av) {
                                let mut ls = LabelSelector::default();
                                let mut sr = Reader::new(sel);
                                while let Some((sf, sv)) = sr.next()? {
                                    if let (1, Value::Bytes(e)) = (sf, sv) {
                                        strings_map(e, &mut ls.match_labels)?;
                                    }
                                }
                                rule.cluster_role_selectors.push(ls);
                            }
                        }
                        role.aggregation_rule = Some(rule);
                    }
                    _ => {}
                }
            }
            Ok(Object::Role(role))
        }
        Kind::RoleBinding | Kind::ClusterRoleBinding => {
            let mut b = Binding::default();
            while let Some((f, v)) = r.next()? {
                match (f, v) {
                    (1, Value::Bytes(m)) => b.metadata = rbac_meta(m)?,
                    (2, Value::Bytes(sub)) => {
                        let mut s = Subject::default();
                        let mut sr = Reader::new(sub);
                        while let Some((sf, sv)) = sr.next()? {
                            if let Value::Bytes(x) = sv {
                                let x = string(x)?;
                                match sf {
                                    1 => s.kind = x,
                                    2 => s.api_group = x,
                                    3 => s.name = x,
                                    4 => s.namespace = x,
                                    _ => {}
                                }
                            }
                        }
                        b.subjects.push(s);
                    }
                    (3, Value::Bytes(rr)) => {
                        let mut rd = Reader::new(rr);
                        while let Some((rf, rv)) = rd.next()? {
                            if let Value::Bytes(x) = rv {
                                let x = string(x)?;
                                match rf {
                                    1 => b.role_ref.api_group = x,
                                    2 => b.role_ref.kind = x,
                                    3 => b.role_ref.name = x,
                                    _ => {}
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            Ok(Object::Binding(b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, b: &[u8]) -> Vec<u8> {
        let mut v = vec![((n << 3) | 2) as u8, b.len() as u8];
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn decodes_token_request() {
        let meta = field(1, b"api");
        let mut spec = field(1, b"vault");
        spec.extend([4 << 3, 0xd0, 0x0f]); // expirationSeconds = 2000
        let mut bound = field(1, b"Pod");
        bound.extend(field(3, b"p1"));
        spec.extend(field(3, &bound));
        let mut obj = field(1, &meta);
        obj.extend(field(2, &spec));
        let mut unknown = field(1, &field(2, b"TokenRequest"));
        unknown.extend(field(2, &obj));
        let mut body = b"k8s\0".to_vec();
        body.extend(unknown);
        let tr = decode_token_request(&body).unwrap();
        assert_eq!(tr.name.as_deref(), Some("api"));
        assert_eq!(tr.audiences, vec!["vault"]);
        assert_eq!(tr.expiration_seconds, Some(2000));
        let b = tr.bound.unwrap();
        assert_eq!((b.kind.as_str(), b.name.as_str()), ("Pod", "p1"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode_token_request(b"nope").is_err());
        assert!(decode_token_request(b"k8s\0\x0a\xff").is_err());
    }
}
