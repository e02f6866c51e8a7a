//! Cryptographically secure random bytes from the operating system.

/// Fills `buf` from the OS CSPRNG.
///
/// Failure means the kernel's random source is unusable; nothing pgmux does (nonces,
/// salts, cancel keys) is safe without it, so this panics rather than degrade.
pub fn fill(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

/// A random `i32`, for BackendKeyData.
pub fn i32() -> i32 {
    let mut b = [0u8; 4];
    fill(&mut b);
    i32::from_be_bytes(b)
}
