//! The node's WireGuard private key: generated on first start, kept in a
//! file (mode 0600, as `wg genkey` output: base64 and a newline), reused on
//! every restart so peers keep working. A key file that others may read is
//! refused at start, as `wg` warns about world-accessible keys.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};

use weft_uapi::Key;

/// Reads the key at `path`, or creates one there.
pub fn load_or_create(path: &Path) -> anyhow::Result<[u8; 32]> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                bail!(
                    "config key `wireguard-key-file`: value `{}` refused: the key is readable by others (mode {:o}); \
                     accepted: a file of mode 0600 (chmod 600 it)",
                    path.display(),
                    mode & 0o777
                );
            }
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            decode(text.trim()).with_context(|| {
                format!("config key `wireguard-key-file`: {} does not hold a base64 WireGuard key", path.display())
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate()?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{}", encode(&key))?;
            tracing::info!(path = %path.display(), "generated a WireGuard private key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// 32 random bytes from the kernel (clamped by x25519 when used).
fn generate() -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("the kernel's random source: {e}"))?;
    Ok(key)
}

/// Standard base64, as WireGuard writes keys.
pub fn encode(key: &[u8; 32]) -> String {
    Key(*key).to_base64()
}

/// A 32-byte key from standard base64.
pub fn decode(s: &str) -> Option<[u8; 32]> {
    Key::from_base64(s).map(|k| k.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_and_guarded() {
        let dir = std::env::temp_dir().join(format!("weft-keys-{}", std::process::id()));
        let path = dir.join("sub/wg.key");
        let _ = std::fs::remove_dir_all(&dir);
        let k1 = load_or_create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), k1, "the same key on restart");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("readable by others") && e.contains("644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(load_or_create(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn base64_round_trip_matches_wg_format() {
        let k = [7u8; 32];
        let s = encode(&k);
        assert_eq!(s.len(), 44);
        assert_eq!(decode(&s), Some(k));
        assert_eq!(decode("AAAA"), None);
    }
}
