//! Files that hold a secret (the API token, the store's token or password, a private
//! key): read only when their owner alone may read or write them, so that a secret others
//! could read, or replace, is refused before it is used.
use std::{
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// Why a secret's file was not read.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {}: not a regular file", path.display())]
    NotAFile { flag: &'static str, path: PathBuf },
    #[error(
        "{flag} {}: mode {mode:04o} lets others than its owner at the secret in it; it must \
         be 0600 or 0400: chmod 600 {}",
        path.display(),
        path.display()
    )]
    Exposed {
        flag: &'static str,
        path: PathBuf,
        mode: u32,
    },
}

/// The bytes of the secret in `path`, named by `flag` in errors. The file must be a
/// regular file with no permission beyond its owner's read and write (0600 or 0400).
pub fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let failed = |source| SecretFileError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    };
    // Looked at before opening: opening a FIFO would wait for a writer.
    if !std::fs::metadata(path).map_err(failed)?.is_file() {
        return Err(SecretFileError::NotAFile {
            flag,
            path: path.to_path_buf(),
        });
    }
    let mut file = std::fs::File::open(path).map_err(failed)?;
    // The mode of the file opened, whatever the path points at by now.
    let mode = file.metadata().map_err(failed)?.permissions().mode() & 0o7777;
    if mode & !0o600 != 0 {
        return Err(SecretFileError::Exposed {
            flag,
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut secret = Vec::new();
    file.read_to_end(&mut secret).map_err(failed)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_file_its_owner_alone_may_read_or_write_is_read() {
        let dir = std::env::temp_dir().join(format!("lb-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
            (0o700, false),
            (0o4600, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match read("--x-file", &path) {
                Ok(secret) => {
                    assert!(ok, "{mode:04o} read");
                    assert_eq!(secret, b"s3cret\n");
                }
                Err(e) => {
                    assert!(!ok, "{mode:04o}: {e}");
                    let text = e.to_string();
                    assert!(
                        text.contains(&format!("--x-file {}: mode {mode:04o}", path.display())),
                        "{text}"
                    );
                }
            }
        }
        let e = read("--x-file", &dir).unwrap_err();
        assert!(matches!(e, SecretFileError::NotAFile { .. }), "{e}");
        let e = read("--x-file", &dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
