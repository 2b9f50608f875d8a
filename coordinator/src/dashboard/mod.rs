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
//! that allows no inline script. Every request must also carry this run's
//! token (a random 256-bit value the command prints once, in the address
//! to open): loopback alone would give any user of the machine, or any
//! container sharing its network, the administrator's read access.

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
    /// This run's token, in hex, and the cookie the browser keeps it in.
    token: Token,
}

/// The token a request must carry: in the query of the address the command
/// prints (`?token=`), which sets it as a cookie and redirects to the same
/// page without it, or in that cookie. Compared in constant time.
struct Token {
    hex: zeroize::Zeroizing<String>,
    /// `confide_dashboard_PORT`: cookies are not kept apart by port, so
    /// two dashboards on one host keep theirs under different names.
    cookie: String,
}

impl Token {
    fn new(port: u16) -> Token {
        use rand_core::{OsRng, RngCore as _};
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut *bytes);
        let hex = zeroize::Zeroizing::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
        Token { hex, cookie: format!("confide_dashboard_{port}") }
    }

    fn matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        given.len() == self.hex.len() && bool::from(given.as_bytes().ct_eq(self.hex.as_bytes()))
    }

    /// The token the request's query gives, if any.
    fn in_query(req: &Request) -> Option<&str> {
        req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("token="))
    }

    /// Whether a cookie of the request carries it.
    fn in_cookies(&self, req: &Request) -> bool {
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .any(|(name, value)| name == self.cookie && self.matches(value))
    }
}

/// A running dashboard.
pub struct RunningDashboard {
    /// Where it listens.
    pub local_addr: SocketAddr,
    /// The address to open: it carries this run's token, which the
    /// browser then keeps in a cookie. Not logged.
    pub address_with_token: zeroize::Zeroizing<String>,
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
    let token = Token::new(local_addr.port());
    let address_with_token = zeroize::Zeroizing::new(format!("http://{local_addr}/?token={}", &*token.hex));
    let state = Arc::new(Dashboard { admin, pki, allowed_names, token });
    let app = Router::new()
        .route("/", get(overview))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/events", get(job_events))
        .route("/models", get(models_page))
        .route("/static/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/static/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    // Bounded: connections (event streams included, each holding a watch
    // on the coordinator) are capped and silent ones closed.
    let join = confide_proto::http::serve(listener, app, confide_proto::http::Bounds::SMALL, "dashboard");
    Ok(RunningDashboard { local_addr, address_with_token, join })
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
    let mut resp = match Token::in_query(&req) {
        // The printed address: keep the token in a cookie (not readable by
        // scripts, not sent by other sites' pages) and show the page
        // without it in the address bar.
        Some(given) if d.token.matches(given) => {
            let cookie = format!("{}={}; HttpOnly; SameSite=Strict; Path=/", d.token.cookie, &*d.token.hex);
            // One leading slash: `//host` would be another site's address
            // (an open redirect; found by review).
            let path = format!("/{}", req.uri().path().trim_start_matches(['/', '\\']));
            let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, path)]).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Some(_) => unauthorised("the token in this address is not this dashboard's"),
        None if d.token.in_cookies(&req) => next.run(req).await,
        None => unauthorised("open the address `confide dashboard` printed when it started (it carries its token)"),
    };
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

/// 401 with the reason; the page names no token.
fn unauthorised(why: &str) -> Response {
    let mut resp = failure(StatusCode::UNAUTHORIZED, why);
    // (A 401 without one is not well formed; no browser prompt follows.)
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Cookie"));
    resp
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
