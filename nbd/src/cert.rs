//! Reads the subject common name out of a DER X.509 certificate, for allow-lists by client
//! certificate name.
//!
//! rustls verifies client certificates but does not expose their fields, and a full X.509
//! parser is a large dependency for one string. This walks only the DER structure down to the
//! subject (`Certificate > tbsCertificate > subject > RDN > AttributeTypeAndValue`) and takes
//! the first `commonName` (OID 2.5.4.3). It is called only on certificates rustls has already
//! verified, but it still treats the bytes as untrusted: every length is checked, nothing
//! panics, and anything unexpected yields `None`.

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_INTEGER: u8 = 0x02;
/// `[0] EXPLICIT` (the optional version field of tbsCertificate).
const TAG_CONTEXT_0: u8 = 0xa0;
/// DER encoding of OID 2.5.4.3 (id-at-commonName).
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// String types a common name may use: UTF8String, PrintableString, TeletexString, IA5String.
const STRING_TAGS: &[u8] = &[0x0c, 0x13, 0x14, 0x16];

/// One DER element: its tag and contents, and what follows it.
fn element(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags do not occur in the fields we walk
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(data: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, body, rest) = element(data)?;
    (t == tag).then_some((body, rest))
}

/// The subject's first common name, when the certificate has one.
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    let (cert, _) = expect(der, TAG_SEQUENCE)?;
    let (tbs, _) = expect(cert, TAG_SEQUENCE)?;
    let mut rest = tbs;
    if let Some((TAG_CONTEXT_0, _, after)) = element(rest) {
        rest = after;
    }
    let (_serial, rest) = expect(rest, TAG_INTEGER)?;
    let (_signature, rest) = expect(rest, TAG_SEQUENCE)?;
    let (_issuer, rest) = expect(rest, TAG_SEQUENCE)?;
    let (_validity, rest) = expect(rest, TAG_SEQUENCE)?;
    let (subject, _) = expect(rest, TAG_SEQUENCE)?;
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (rdn, next) = expect(rdns, TAG_SET)?;
        rdns = next;
        let mut attrs = rdn;
        while !attrs.is_empty() {
            let (attr, next) = expect(attrs, TAG_SEQUENCE)?;
            attrs = next;
            let (oid, value) = expect(attr, TAG_OID)?;
            if oid != OID_COMMON_NAME {
                continue;
            }
            let (tag, text, _) = element(value)?;
            if !STRING_TAGS.contains(&tag) {
                return None;
            }
            return std::str::from_utf8(text).ok().map(str::to_owned);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncations_yield_none() {
        assert_eq!(subject_common_name(&[]), None);
        assert_eq!(
            subject_common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(subject_common_name(&[0x30, 0x03, 0x30, 0x01]), None);
        assert_eq!(subject_common_name(&[0x1f, 0x00]), None);
    }

    #[test]
    fn long_form_lengths_are_read() {
        let mut data = vec![0x04, 0x81, 200];
        data.extend(std::iter::repeat_n(7u8, 200));
        let (tag, body, rest) = element(&data).unwrap();
        assert_eq!((tag, body.len(), rest.len()), (0x04, 200, 0));
    }
}
