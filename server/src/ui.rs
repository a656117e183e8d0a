//! The dashboard: the files `vite build` made of `ui/`, embedded at compile
//! time (`build.rs` writes the table), served at `/` with a strict
//! Content-Security-Policy. A path that is not a file is a client route and
//! gets `index.html`, except under `/api/`, which stays the API's (a JSON 404).
//!
//! `CI_UI_DIR=<dir>` serves a built `ui/dist` from disk instead, read on every
//! request, so the dashboard can be worked on without rebuilding `ci`.
//!
//! Architecture invariant: nothing here reads the store or the run manager;
//! the dashboard sees what any client of `/api/v1` sees.

use std::path::{Component, Path, PathBuf};

use axum::extract::Path as UrlPath;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));
}

/// No inline script or style, nothing from elsewhere, no framing, no plugins.
/// `blob:` is for downloads the page assembles (logs fetched with a token).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'";

/// The routes of the dashboard; merged into the API's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| serve(String::new())))
        .route(
            "/{*path}",
            get(|UrlPath(path): UrlPath<String>| serve(path)),
        )
}

async fn serve(path: String) -> Response {
    if path == "api" || path.starts_with("api/") {
        return ApiError::not_found("No such endpoint; `/api/v1/openapi.json` lists them")
            .into_response();
    }
    let dir = std::env::var_os("CI_UI_DIR").map(PathBuf::from);
    let want = if path.is_empty() {
        "index.html"
    } else {
        path.as_str()
    };
    if let Some(body) = find(dir.as_deref(), want) {
        return answer(want, body);
    }
    // A missing asset is a 404; anything else is a route of the page (run
    // ids hold dots, so a dot does not make a path a file).
    if want.starts_with("assets/") || want == "favicon.ico" {
        return ApiError::not_found(format!("The dashboard has no file `{want}`")).into_response();
    }
    match find(dir.as_deref(), "index.html") {
        Some(body) => answer("index.html", body),
        None => ApiError::not_found("This `ci` was built without the dashboard").into_response(),
    }
}

/// A file of the built dashboard, from `dir` when given, else embedded.
fn find(dir: Option<&Path>, path: &str) -> Option<std::borrow::Cow<'static, [u8]>> {
    match dir {
        Some(dir) => {
            let rel = Path::new(path);
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return None;
            }
            std::fs::read(dir.join(rel)).ok().map(Into::into)
        }
        None => assets::ASSETS
            .iter()
            .find(|(name, _)| *name == path)
            .map(|(_, bytes)| std::borrow::Cow::Borrowed(*bytes)),
    }
}

fn answer(path: &str, body: std::borrow::Cow<'static, [u8]>) -> Response {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    let kind = match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    // Vite names assets by their content: those never change.
    let cache = if path.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let body = match body {
        std::borrow::Cow::Borrowed(b) => axum::body::Body::from(b),
        std::borrow::Cow::Owned(v) => axum::body::Body::from(v),
    };
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}
