//! A coordinator in this process and an administrator's client of it: what
//! the federation benches (`joint --latency`, `incremental`) share.

use std::path::Path;
use std::time::{Duration, Instant};

use confide_coordinator::server::{self, CoordinatorConfig, RunningCoordinator};
use confide_crypto::pki::PkiDir;
use confide_proto::net::{ClientIdentity, connect};
use confide_proto::pb::{self, admin_service_client::AdminServiceClient};
use confide_proto::status::JobStatus;
use tonic::transport::Channel;

fn e(e: &dyn std::fmt::Display) -> String {
    e.to_string()
}

/// Starts a coordinator on loopback with its data under `dir` and `pki`;
/// returns it and its URL.
pub async fn start_coordinator(dir: &Path, pki: &PkiDir) -> Result<(RunningCoordinator, String), String> {
    let coordinator = server::start(CoordinatorConfig {
        listen: "127.0.0.1:0".parse().map_err(|_| "addr")?,
        data_dir: dir.join("coordinator"),
        pki: pki.root().to_path_buf(),
        limits: Default::default(),
        models: Default::default(),
        metrics: Default::default(),
    })
    .await
    .map_err(|x| e(&x))?;
    let url = format!("https://{}", coordinator.local_addr);
    Ok((coordinator, url))
}

/// The administrator's admin-API client of the coordinator at `url`.
pub async fn admin(pki: &PkiDir, url: &str) -> Result<AdminServiceClient<Channel>, String> {
    let (ca, cert, key) = (pki.ca_cert(), pki.admin_cert(), pki.admin_key());
    let id = ClientIdentity { url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
    Ok(AdminServiceClient::new(connect(&id).await.map_err(|x| e(&x))?))
}

/// Polls job `job` until `until` holds (at most 600 s).
pub async fn wait(
    admin: &mut AdminServiceClient<Channel>,
    job: &str,
    until: impl Fn(&JobStatus) -> bool,
) -> Result<JobStatus, String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = admin
            .get_job(pb::JobRef { job_id: job.to_owned(), round: None })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let st = JobStatus::try_from(st).map_err(|x| e(&x))?;
        if until(&st) {
            return Ok(st);
        }
        if Instant::now() > deadline {
            return Err(format!("job {job} did not get there in 600 s: {:?}", st.pipeline_phase));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for job `job` to end; an error unless it succeeded.
pub async fn wait_succeeded(admin: &mut AdminServiceClient<Channel>, job: &str) -> Result<JobStatus, String> {
    let st = wait(admin, job, |s| s.state.is_terminal()).await?;
    if st.state.as_str() != "succeeded" {
        return Err(format!("job {job}: {}", st.error.unwrap_or_default()));
    }
    Ok(st)
}

/// Job `job`'s newest kept model version.
pub async fn latest_version(admin: &mut AdminServiceClient<Channel>, job: &str) -> Result<pb::ModelVersion, String> {
    admin
        .list_models(pb::ListModelsRequest { job_id: job.to_owned() })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .models
        .into_iter()
        .max_by_key(|m| m.round)
        .ok_or_else(|| format!("job {job} has no model version"))
}
