//! The annotation server: the page, the stats page and the JSON API, as an axum [`Router`].
//!
//! Every `/api/*` call carries `Authorization: Bearer TOKEN`; a bad request is answered with a 4xx
//! status and `{"error": "..."}` naming what was wrong (400 bad body, 401 missing or unknown token,
//! 404 no such item / nothing to undo / no such route, 405 wrong method, 409 item already judged).
//! Nothing is logged per request, so no token reaches a log.
//!
//! | call | answer |
//! |---|---|
//! | `GET /api/next` | `{"item", "prompt", "a", "b"}`, or 204 when nothing is left for this annotator |
//! | `POST /api/judgments` `{"item", "choice": "a"/"b"/"tie", "comment"?}` | `{"judgment", "progress"}` |
//! | `POST /api/undo` | `{"undone": judgment, "shown": item as in /api/next}` |
//! | `GET /api/judgments` | this annotator's judgments, oldest first |
//! | `GET /api/me` | `{"name", "judged", "left", "per_item"}` |
//! | `GET /api/stats` | [`Stats`](crate::Stats) |

use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use crate::error::{AnnotateError, Result};
use crate::store::{Annotator, Choice, Store};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const STATS_HTML: &str = include_str!("../assets/stats.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STATS_JS: &str = include_str!("../assets/stats.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// Only our own scripts and styles; nothing loaded from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the handlers share: the database and the judgments an item needs to be done.
#[derive(Clone)]
pub struct AppState {
    store: Arc<Mutex<Store>>,
    per_item: usize,
}

impl AppState {
    pub fn new(store: Store, per_item: usize) -> Self {
        Self { store: Arc::new(Mutex::new(store)), per_item: per_item.max(1) }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // a panic while holding the lock cannot leave SQLite half-written (transactions roll back)
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` for the annotator whose token the request carries.
    fn as_annotator<T>(&self, headers: &HeaderMap, f: impl FnOnce(&mut Store, &Annotator) -> Result<T>) -> Result<T> {
        let token = bearer(headers)?;
        let mut store = self.store();
        let who = store.authenticate(token)?;
        f(&mut store, &who)
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str> {
    let value = headers.get(header::AUTHORIZATION).ok_or(AnnotateError::MissingToken)?;
    let value = value.to_str().map_err(|_| AnnotateError::MissingToken)?.trim();
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(AnnotateError::MissingToken),
    }
}

impl IntoResponse for AnnotateError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            eprintln!("annotate: {self}");
        }
        json_response(status, &json!({"error": self.to_string()}))
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    let body = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    (status, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    // the page's URL holds the token: never send it to another site
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JudgeBody {
    item: i64,
    choice: Choice,
    #[serde(default)]
    comment: Option<String>,
}

async fn next(State(app): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let shown = app.as_annotator(&headers, |store, who| store.next(who, app.per_item))?;
    Ok(match shown {
        Some(shown) => json_response(StatusCode::OK, &shown),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

async fn judge(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response> {
    app.as_annotator(&headers, |store, who| {
        let body: JudgeBody = serde_json::from_slice(&body).map_err(|e| {
            AnnotateError::BadRequest(format!(
                "invalid judgment: {e}; expected {{\"item\": <integer>, \"choice\": \"a\" | \"b\" | \"tie\", \"comment\"?: <string>}}"
            ))
        })?;
        let judgment = store.judge(who, body.item, body.choice, body.comment.as_deref())?;
        let progress = store.progress(who, app.per_item)?;
        Ok(json_response(StatusCode::OK, &json!({"judgment": judgment, "progress": progress})))
    })
}

async fn undo(State(app): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let (undone, shown) = app.as_annotator(&headers, |store, who| store.undo(who))?;
    Ok(json_response(StatusCode::OK, &json!({"undone": undone, "shown": shown})))
}

async fn my_judgments(State(app): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let judgments = app.as_annotator(&headers, |store, who| store.judgments_of(who))?;
    Ok(json_response(StatusCode::OK, &judgments))
}

async fn me(State(app): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let progress = app.as_annotator(&headers, |store, who| store.progress(who, app.per_item))?;
    Ok(json_response(StatusCode::OK, &json!({"name": progress.name, "judged": progress.judged, "left": progress.left, "per_item": app.per_item})))
}

async fn stats(State(app): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let stats = app.as_annotator(&headers, |store, _| store.stats(app.per_item))?;
    Ok(json_response(StatusCode::OK, &stats))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    json_response(StatusCode::NOT_FOUND, &json!({"error": format!("no such route: {method} {}", uri.path())}))
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": format!("{} does not take {method}", uri.path())}))
}

/// The page, the stats page, their assets and the API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/stats", get(|| async { asset("text/html; charset=utf-8", STATS_HTML) }))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/stats.js", get(|| async { asset("text/javascript; charset=utf-8", STATS_JS) }))
        .route("/assets/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/next", get(next))
        .route("/api/judgments", get(my_judgments).post(judge))
        .route("/api/undo", axum::routing::post(undo))
        .route("/api/me", get(me))
        .route("/api/stats", get(stats))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

/// Serves [`router`] on an already bound listener until Ctrl-C (blocking; builds its own tokio
/// runtime). Binding first lets the caller print the real address (port 0 picks a free one).
pub fn serve(listener: TcpListener, state: AppState) -> Result<()> {
    let server_error = |context: &str| {
        let context = context.to_string();
        move |cause| AnnotateError::Server { context, cause }
    };
    let addr = listener.local_addr().map_err(server_error("listener"))?;
    listener.set_nonblocking(true).map_err(server_error("listener"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(server_error("tokio runtime"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(server_error("listener"))?;
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                // no handler for Ctrl-C means: run until killed (every judgment is committed anyway)
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
            .await
            .map_err(server_error(&format!("serving on {addr}")))
    })
}
