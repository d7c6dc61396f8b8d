//! The `tenant` key of an `infer`: which tenant (team, customer, application) a request
//! belongs to, for a worker that shares its queue fairly between tenants.
//!
//! A tenant name comes from a client and ends up as a key of the worker's scheduler, in
//! logs and, for tenants an operator configured, in a metric label, so it is checked where
//! it enters: 1 to [`MAX_TENANT_LEN`] bytes of UTF-8 without control characters. The
//! full decoder refuses anything else `bad_request` under the request's id; the raw
//! scanner leaves such a body to the full decoder, so a balancer never forwards one.

/// The longest tenant name, in bytes.
pub const MAX_TENANT_LEN: usize = 64;

/// Why a value is no tenant name; the text completes "tenant ...".
pub fn check(value: &[u8]) -> Result<&str, &'static str> {
    if value.is_empty() {
        return Err("is empty (leave the key out instead)");
    }
    if value.len() > MAX_TENANT_LEN {
        return Err("is longer than 64 bytes");
    }
    let text = std::str::from_utf8(value).map_err(|_| "is not UTF-8")?;
    if text.chars().any(char::is_control) {
        return Err("holds a control character");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_tenants() {
        for name in ["acme", "team-a.prod", "Ünïcode 名前", &"x".repeat(64)] {
            assert_eq!(check(name.as_bytes()), Ok(name));
        }
    }

    #[test]
    fn empty_long_binary_and_control_values_are_not() {
        assert!(check(b"").is_err());
        assert!(check("x".repeat(65).as_bytes()).is_err());
        assert_eq!(check(b"\xff\xfe"), Err("is not UTF-8"));
        assert_eq!(check(b"a\nb"), Err("holds a control character"));
        assert!(check(b"a\x1b[31m").is_err());
    }
}
