//! Password hashes for HTTP basic auth, in crypt(3)'s formats as `mkpasswd -m sha-512`
//! and `htpasswd -B` write them: SHA-512-crypt (`$6$`), SHA-256-crypt (`$5$`) and bcrypt
//! (`$2a$`, `$2b$`, `$2y$`). A password given in the clear is hashed (`$6$`, a random salt)
//! before it is stored, so the store never holds one.
use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt, password_hash};

/// Whether `hash` is in a format lb checks passwords against.
pub fn check_format(hash: &str) -> Result<(), String> {
    let known = ["$6$", "$5$", "$2a$", "$2b$", "$2y$"];
    if !known.iter().any(|p| hash.starts_with(p)) {
        return Err(format!(
            "not a password hash lb reads: SHA-512-crypt ($6$, `mkpasswd -m sha-512`), SHA-256-crypt ($5$) or bcrypt ($2y$, `htpasswd -nB`), got {:?}",
            hash.chars().take(4).collect::<String>()
        ));
    }
    // The layout only: checking costs no hashing (bcrypt's can take a quarter second).
    let well_formed = if hash.starts_with("$2") {
        hash.parse::<bcrypt::HashParts>().is_ok()
    } else {
        sha_crypt_layout(hash)
    };
    if well_formed {
        Ok(())
    } else {
        Err("a malformed password hash".into())
    }
}

/// `$6$[rounds=N$]salt$hash`: a salt of at most 16 characters and a hash of 86 (`$6$`) or
/// 43 (`$5$`), all in crypt's base64 alphabet.
fn sha_crypt_layout(hash: &str) -> bool {
    let fields: Vec<&str> = hash.split('$').collect();
    let (id, rest) = match fields.as_slice() {
        ["", id, rest @ ..] => (*id, rest),
        _ => return false,
    };
    let rest = match rest {
        [rounds, rest @ ..] if rounds.starts_with("rounds=") => {
            if rounds["rounds=".len()..].parse::<u32>().is_err() {
                return false;
            }
            rest
        }
        rest => rest,
    };
    let crypt64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    };
    let length = if id == "6" { 86 } else { 43 };
    matches!(rest, [salt, sum] if salt.len() <= 16 && crypt64(salt) && sum.len() == length && crypt64(sum))
}

/// Whether `password` is the one `hash` was made from (false for a malformed hash).
pub fn verify(password: &[u8], hash: &str) -> bool {
    verify_inner(password, hash).unwrap_or(false)
}

fn verify_inner(password: &[u8], hash: &str) -> Result<bool, String> {
    if hash.starts_with("$2") {
        return bcrypt::verify(password, hash).map_err(|e| e.to_string());
    }
    match ShaCrypt::default().verify_password(password, hash) {
        Ok(()) => Ok(true),
        Err(password_hash::Error::PasswordInvalid) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// `password` hashed with SHA-512-crypt (5000 rounds, crypt's default) and a random salt.
pub fn hash(password: &str) -> String {
    let mut salt = [0u8; 12];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut salt)
        .expect("the system's random source");
    ShaCrypt::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .expect("SHA-512-crypt takes any password")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_made_here_and_by_the_usual_tools_verify() {
        let h = hash("s3cret");
        assert!(h.starts_with("$6$"), "{h}");
        assert!(verify(b"s3cret", &h));
        assert!(!verify(b"s3cret!", &h));
        assert_ne!(hash("s3cret"), h, "salted");
        check_format(&h).unwrap();
        // `openssl passwd -6 -salt saltsaltsalt password1` (what `mkpasswd -m sha-512` makes),
        // and `-5`.
        let sha512 = "$6$saltsaltsalt$u9YMl6Ha1eAa1Vl5wiqeJes.HljTizdGIGgmTGTX4Tifu8VM14tmnqb7HK/0z6d7vd3lK1IoYHYI4qJIBNIUk.";
        let sha256 = "$5$saltsaltsalt$mnB4.bQiklClGfZArHKrmuY9oVnWSZS2wyHICURQPk.";
        for h in [sha512, sha256] {
            check_format(h).unwrap();
            assert!(verify(b"password1", h), "{h}");
            assert!(!verify(b"password2", h), "{h}");
        }
        // bcrypt, as `htpasswd -nbB` writes it.
        let bcrypt = bcrypt::hash("password1", 4).unwrap();
        check_format(&bcrypt).unwrap();
        assert!(verify(b"password1", &bcrypt));
        assert!(!verify(b"password", &bcrypt));
        for bad in ["password1", "$1$abc$def", "$6$salt", "$2y$04$short"] {
            assert!(check_format(bad).is_err(), "{bad}");
            assert!(!verify(b"password1", bad), "{bad}");
        }
    }
}
