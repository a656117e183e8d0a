//! Errors: what a request gets back (`{"error": {"code", "message"}}` with a
//! status), and what can stop the server from starting.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Why the server could not start or keep going.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("Cannot listen on `{addr}`; pick another address with `--listen`")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Workspace `{}` could not be loaded", dir.display())]
    Workspace {
        dir: std::path::PathBuf,
        #[source]
        source: strata_engine::LoadError,
    },
    #[error("Two workspaces are named `{0}`; give one a `name = \"...\"` in its `ci.toml`")]
    DuplicateWorkspace(String),
    #[error(transparent)]
    Store(#[from] strata_store::Error),
    #[error(transparent)]
    Build(#[from] strata_engine::BuildError),
    #[error("Cannot {action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The token file `{}` is not valid JSON; fix or remove it", path.display())]
    TokenFile {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("No token named `{0}`; `ci serve token ls` lists them")]
    UnknownToken(String),
    #[error("A token named `{0}` exists; revoke it first or pick another name")]
    DuplicateToken(String),
    #[error("Token names use `A-Z a-z 0-9 . _ -` (1 to 64 characters), not `{0}`")]
    BadTokenName(String),
    #[error("Tokens need an on-disk store; `memory://` keeps none")]
    NoTokenFile,
    #[error("Cannot watch `{}`", path.display())]
    Watch {
        path: std::path::PathBuf,
        #[source]
        source: notify::Error,
    },
}

impl ServerError {
    /// Whether the user can fix this by changing what they asked for.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            ServerError::Workspace { .. }
                | ServerError::DuplicateWorkspace(_)
                | ServerError::UnknownToken(_)
                | ServerError::DuplicateToken(_)
                | ServerError::BadTokenName(_)
                | ServerError::NoTokenFile
                | ServerError::Listen { .. }
        )
    }
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable word: `bad_request`, `not_found`, `unauthorized`, `forbidden`,
    /// `conflict`, `too_large`, `internal`, `unavailable`.
    pub code: String,
    /// For people: what is wrong and what to do.
    pub message: String,
}

/// An error answer: a status and a message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    fn code(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::RANGE_NOT_SATISFIABLE => "bad_range",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            s if s.is_client_error() => "bad_request",
            _ => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Store errors: bad names and unknown things are the client's; the rest
/// are the server's (a 500 with the message, never a panic).
impl From<strata_store::Error> for ApiError {
    fn from(e: strata_store::Error) -> ApiError {
        use strata_store::Error as E;
        let status = match &e {
            E::UnknownLayer { .. }
            | E::UnknownLabel { .. }
            | E::NoSuchPath { .. }
            | E::NoSuchRef(_) => StatusCode::NOT_FOUND,
            E::BadDigest { .. }
            | E::BadName { .. }
            | E::AmbiguousPrefix { .. }
            | E::WrongKind { .. }
            | E::BadRefName { .. }
            | E::BadPattern { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, chain(&e))
    }
}

impl From<strata_engine::BuildError> for ApiError {
    fn from(e: strata_engine::BuildError) -> ApiError {
        use strata_engine::BuildError as B;
        let status = match &e {
            B::UnknownRun { .. } => StatusCode::NOT_FOUND,
            _ if e.is_user_error() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, chain(&e))
    }
}

impl From<strata_engine::LoadError> for ApiError {
    fn from(e: strata_engine::LoadError) -> ApiError {
        let status = if e.is_user_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, chain(&e))
    }
}

impl From<strata_engine::ModelError> for ApiError {
    fn from(e: strata_engine::ModelError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

pub use strata_engine::error_chain as chain;
