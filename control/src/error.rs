//! Errors of the weft crate's pure parts (configuration, datastore).

/// A configuration value weft refuses, with what it would accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: value `{value}` refused: {accepted}")]
pub struct ConfigError {
    /// The key, as written in the file or as a flag without dashes.
    pub key: String,
    /// The value given.
    pub value: String,
    /// What would be accepted.
    pub accepted: String,
}

impl ConfigError {
    /// A refusal of `value` for `key`.
    pub fn new(key: &str, value: impl ToString, accepted: impl ToString) -> Self {
        ConfigError { key: key.to_string(), value: value.to_string(), accepted: accepted.to_string() }
    }
}

/// Why a datastore (static file or lease value) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file's path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON document did not parse or has the wrong shape.
    #[error("{what}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A subnet key is not of the form `10.244.1.0-24` (or dual-stack
    /// `10.244.1.0-24&fd00:0:0:1::-64`).
    #[error("subnet key `{0}` is not of the form 10.244.1.0-24 or 10.244.1.0-24&fd00::-64")]
    SubnetKey(String),
    /// A value is present but invalid.
    #[error("{what}: `{value}` refused: {accepted}")]
    Invalid {
        /// Which field.
        what: String,
        /// The value given.
        value: String,
        /// What would be accepted.
        accepted: String,
    },
}

/// Why weft's nftables table could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    /// `nft` refused the transaction; nothing of it was applied.
    #[error("nft refused the transaction for table inet weft: {}", .stderr.trim())]
    Refused {
        /// What `nft` said.
        stderr: String,
    },
    /// `nft` (Debian package `nftables`) could not be run, or answered
    /// something unreadable.
    #[error("running nft (Debian package nftables) for table inet weft: {0}")]
    Nft(nftables::helper::NftablesError),
}

impl From<nftables::helper::NftablesError> for MasqError {
    fn from(e: nftables::helper::NftablesError) -> Self {
        match e {
            nftables::helper::NftablesError::NftFailed { stderr, .. } => MasqError::Refused { stderr },
            other => MasqError::Nft(other),
        }
    }
}
