//! `confide dashboard`: a web dashboard on the administrator's machine.
//!
//! It talks to the coordinator's admin API with the administrator's
//! certificate and serves pages locally, so browsers need no client
//! certificate and nothing new is exposed on the coordinator. Pages are
//! rendered on the server ([`render`]); a job page subscribes to the job's
//! event stream (`WatchJob`) through server-sent events, and the small
//! checked-in script swaps each update in. The dashboard only reads: it
//! cannot submit, cancel or deploy.
//!
//! Whoever can reach the listen address can read what the administrator
//! can, so it listens on loopback by default, answers only requests whose
//! `Host` is `localhost`, an IP literal or a name given with `--allow-host`
//! (a web page cannot reach it through DNS rebinding, which sends the
//! page's own name), refuses requests that pages of other sites
//! make (`Sec-Fetch-Site`, `Origin`: an event stream opened from one would
//! hold a watch on the coordinator), and sends a content security policy
//! that allows no inline script.

pub mod render;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use confide_crypto::pki::PkiDir;
use confide_proto::deploy::SignedDeployment;
use confide_proto::pb;
use confide_proto::pb::admin_service_client::AdminServiceClient;
use confide_proto::status::JobStatus;
use futures::{Stream, StreamExt};
use tonic::transport::Channel;

use crate::Error;

const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// What the handlers share.
struct Dashboard {
    admin: AdminServiceClient<Channel>,
    /// The federation's PKI: deployment records are verified against its CA
    /// and revocation list, not taken on the coordinator's word.
    pki: PkiDir,
    /// Host names answered besides `localhost` and IP literals
    /// (`--allow-host`).
    allowed_names: Vec<String>,
}

/// A running dashboard.
pub struct RunningDashboard {
    /// Where it listens.
    pub local_addr: SocketAddr,
    join: tokio::task::JoinHandle<()>,
}

impl RunningDashboard {
    /// Serves until the process ends.
    pub async fn wait(self) -> Result<(), Error> {
        self.join.await.map_err(|e| Error::Io(format!("dashboard: {e}")))
    }
}

/// Binds `listen` and serves the dashboard from `admin`, a connected
/// admin-API client; `allowed_names` are host names (besides `localhost`
/// and IP literals) that browsers may use to reach it.
pub async fn start(
    listen: SocketAddr,
    admin: AdminServiceClient<Channel>,
    pki: PkiDir,
    allowed_names: Vec<String>,
) -> Result<RunningDashboard, Error> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Io(format!("dashboard --listen {listen}: {e}")))?;
    let local_addr = listener.local_addr().map_err(|e| Error::Io(format!("dashboard --listen {listen}: {e}")))?;
    let state = Arc::new(Dashboard { admin, pki, allowed_names });
    let app = Router::new()
        .route("/", get(overview))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/events", get(job_events))
        .route("/models", get(models_page))
        .route("/static/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/static/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    let join = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("dashboard: {e}");
        }
    });
    Ok(RunningDashboard { local_addr, join })
}

/// Refuses requests for another host name (DNS rebinding) and adds the
/// security headers to every answer.
async fn guard(State(d): State<Arc<Dashboard>>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !confide_proto::net::http_host_allowed(host, &d.allowed_names) {
        return (StatusCode::MISDIRECTED_REQUEST, format!("this dashboard does not answer for host {host:?}\n"))
            .into_response();
    }
    if from_another_site(&req, host) {
        return (StatusCode::FORBIDDEN, "this dashboard does not answer requests made by pages of other sites\n")
            .into_response();
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Whether a page of another site made the request: the browser says so
/// (`Sec-Fetch-Site`), other than for a link followed to one of the pages,
/// or an `Origin` that is not this dashboard's. Such a page cannot read the
/// answer (no CORS headers), but an event stream it opens would hold a
/// watch on the coordinator for as long as it likes.
fn from_another_site(req: &Request, host: &str) -> bool {
    let h = req.headers();
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    // A link followed to a page, not to an event stream (a tab held open on
    // one would hold its watch).
    let navigation = text("sec-fetch-mode") == Some("navigate")
        && req.method() == axum::http::Method::GET
        && !req.uri().path().ends_with("/events");
    if matches!(text("sec-fetch-site"), Some("cross-site" | "same-site")) && !navigation {
        return true;
    }
    h.get(header::ORIGIN).is_some_and(|o| o.as_bytes() != format!("http://{host}").as_bytes())
}

/// An error page naming what failed.
fn failure(code: StatusCode, what: &str) -> Response {
    (code, Html(render::page("error", &format!("<p class=\"error\">{}</p>", render::esc(what))))).into_response()
}

fn rpc_failure(what: &str, s: &tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    failure(code, &format!("{what}: the coordinator answered: {}", s.message()))
}

/// A job id as the coordinator makes them; anything else is refused
/// before it reaches the admin API.
fn check_job_id(id: &str) -> Option<Response> {
    let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    (!ok).then(|| failure(StatusCode::BAD_REQUEST, &format!("job id {id:?}: not a job id")))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn overview(State(d): State<Arc<Dashboard>>) -> Response {
    let mut admin = d.admin.clone();
    let parties = match admin.list_parties(pb::ListPartiesRequest {}).await {
        Ok(r) => r.into_inner().parties,
        Err(s) => return rpc_failure("list parties", &s),
    };
    let jobs = match admin.list_jobs(pb::ListJobsRequest {}).await {
        Ok(r) => r.into_inner().jobs,
        Err(s) => return rpc_failure("list jobs", &s),
    };
    let jobs: Vec<JobStatus> = match jobs.into_iter().map(JobStatus::try_from).collect() {
        Ok(j) => j,
        Err(e) => return failure(StatusCode::BAD_GATEWAY, &format!("list jobs: {e}")),
    };
    Html(render::page("Federation", &render::overview(&parties, &jobs, unix_now()))).into_response()
}

async fn job_page(State(d): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    if let Some(refused) = check_job_id(&id) {
        return refused;
    }
    let mut admin = d.admin.clone();
    let st = match admin.get_job(pb::JobRef { job_id: id.clone(), round: None }).await {
        Ok(r) => r.into_inner(),
        Err(s) => return rpc_failure(&format!("job {id}"), &s),
    };
    match JobStatus::try_from(st) {
        Ok(st) => Html(render::page(&format!("Job {id}"), &render::job_page(&st))).into_response(),
        Err(e) => failure(StatusCode::BAD_GATEWAY, &format!("job {id}: {e}")),
    }
}

/// The job's live updates: one `status` event (the re-rendered page body)
/// per change the coordinator's `WatchJob` stream reports, then `end`.
async fn job_events(State(d): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    if let Some(refused) = check_job_id(&id) {
        return refused;
    }
    let mut admin = d.admin.clone();
    let stream = match admin.watch_job(pb::JobRef { job_id: id.clone(), round: None }).await {
        Ok(r) => r.into_inner(),
        Err(s) => return rpc_failure(&format!("job {id}"), &s),
    };
    Sse::new(status_events(stream)).keep_alive(KeepAlive::default()).into_response()
}

fn status_events(
    stream: impl Stream<Item = Result<pb::JobStatus, tonic::Status>> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    stream
        .map(|item| {
            let event = match item
                .map_err(|s| s.message().to_owned())
                .and_then(|st| JobStatus::try_from(st).map_err(|e| e.to_string()))
            {
                Ok(st) => Event::default()
                    .event("status")
                    .id(format!("{}-{}", st.rounds_completed, st.updated_at))
                    .data(render::job_page(&st)),
                // Shown with textContent: raw text, not HTML.
                Err(e) => Event::default().event("failure").data(e),
            };
            Ok(event)
        })
        // A `data` line, or browsers do not dispatch the event.
        .chain(futures::stream::once(async { Ok(Event::default().event("end").data("end")) }))
}

async fn models_page(State(d): State<Arc<Dashboard>>) -> Response {
    let mut admin = d.admin.clone();
    let models = match admin.list_models(pb::ListModelsRequest::default()).await {
        Ok(r) => r.into_inner().models,
        Err(s) => return rpc_failure("list models", &s),
    };
    let (services, more_services) = match admin.list_services(pb::ListServicesRequest::default()).await {
        Ok(r) => {
            let r = r.into_inner();
            (r.services, r.truncated)
        }
        Err(s) => return rpc_failure("list services", &s),
    };
    let verified = match verify_services(&d.pki, &services) {
        Ok(v) => v,
        Err(e) => return failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    Html(render::page("Models and services", &render::models(&models, &verified, more_services))).into_response()
}

/// Each service's deployment history, verified against the CA and the
/// revocation list of the administrator's PKI directory.
fn verify_services(pki: &PkiDir, services: &[pb::ServiceStatus]) -> Result<Vec<render::ServiceView>, Error> {
    let ca = std::fs::read(pki.ca_cert()).map_err(|e| Error::io(&pki.ca_cert(), e))?;
    let revocations = pki.revocations()?;
    Ok(services
        .iter()
        .map(|s| render::ServiceView {
            name: s.service.clone(),
            history: s
                .deployments
                .iter()
                .map(|d| SignedDeployment::verify(d, &ca, &revocations).map_err(|e| e.to_string()))
                .collect(),
            serving: s.serving.clone(),
            serving_parties: s.serving_parties.clone(),
            total: s.deployments_total,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_its_own_hosts_are_answered() {
        use confide_proto::net::http_host_allowed;
        let ok = [
            "127.0.0.1:8090",
            "localhost:8090",
            "LOCALHOST:8090",
            "localhost.:8090",
            "[::1]:8090",
            "[::1]",
            "10.0.0.7:8090",
            "127.0.0.1:80",
            "localhost",
        ];
        for host in ok {
            assert!(http_host_allowed(host, &[]), "{host}");
        }
        let refused = [
            "attacker.example:8090",
            "attacker.example",
            "localhost.attacker.example:8090",
            "127.0.0.1.attacker.example",
            "",
            ":8090",
            "dash.hospital.org:8090",
            "localhost:x",
            "[::1",
            "[::1]x",
            "[attacker.example]:80",
        ];
        for host in refused {
            assert!(!http_host_allowed(host, &[]), "{host}");
        }
        assert!(http_host_allowed("dash.hospital.org:8090", &["dash.hospital.org".into()]));
        assert!(http_host_allowed("DASH.hospital.org", &["dash.hospital.org".into()]));
    }

    #[test]
    fn job_ids_are_checked_before_the_admin_api() {
        assert!(check_job_id("j1a23fea5006-6edc").is_none());
        for bad in ["", "../etc", "a/b", "x y", &"a".repeat(129)] {
            assert!(check_job_id(bad).is_some(), "{bad}");
        }
    }
}
