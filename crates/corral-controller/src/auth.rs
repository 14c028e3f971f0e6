//! Bearer-token authentication. Only a SHA-256 of the admin token is stored; the token itself is
//! written once, with 0600 permissions, to a file the operator reads.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::{ApiError, Ctx};

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A new random token: 32 bytes, hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn require_token(
    State(ctx): State<Ctx>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return Err(ApiError::Unauthorized(
            "this endpoint needs a token: send `Authorization: Bearer TOKEN`".into(),
        ));
    };
    if !constant_time_eq(&hash(token.trim()), &ctx.admin_token_hash) {
        return Err(ApiError::Unauthorized(
            "the token is not valid: use the admin token the controller wrote to DATA_DIR/admin-token".into(),
        ));
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compare_by_hash() {
        let a = new_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_token());
        assert!(constant_time_eq(&hash(&a), &hash(&a)));
        assert!(!constant_time_eq(&hash(&a), &hash("x")));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
