//! The dashboard's pages, rendered on the server: HTML with inline SVG
//! charts, no script needed to read them (the script only swaps in the
//! live updates). Every string from the coordinator is escaped: party names,
//! drop reasons and advertised policies come from parties, which may be
//! malicious.

use std::collections::BTreeMap;
use std::fmt::Write;

use confide_proto::deploy::{DeployAction, SignedDeployment};
use confide_proto::pb;
use confide_proto::status::{JobState, JobStatus, RoundRecord};

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// A whole page around `body`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · Confide</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head>\n\
         <body><header><a class=\"brand\" href=\"/\">Confide</a>\
         <nav><a href=\"/\">Federation</a><a href=\"/models\">Models and services</a></nav></header>\n\
         <main>{body}</main>\n<script src=\"/static/app.js\"></script></body></html>\n",
        t = esc(title)
    )
}

/// A Unix time as UTC `YYYY-MM-DD HH:MM` (empty for 0).
pub fn when(unix: u64) -> String {
    if unix == 0 {
        return String::new();
    }
    match time::OffsetDateTime::from_unix_timestamp(unix as i64) {
        Ok(t) => format!("{:04}-{:02}-{:02} {:02}:{:02}", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute()),
        Err(_) => unix.to_string(),
    }
}

fn state_badge(state: JobState) -> String {
    format!("<span class=\"badge state-{s}\">{s}</span>", s = state.as_str())
}

fn privacy_line(st: &JobStatus) -> String {
    let p = &st.privacy;
    let mut s = format!("aggregation <b>{}</b>", esc(&p.aggregation));
    match (&p.dp, p.epsilon, p.delta) {
        (Some(level), Some(eps), Some(delta)) => {
            let _ = write!(
                s,
                ", {}-level DP: ε = <b id=\"epsilon\">{eps:.4}</b> spent at δ = {delta:e} ({} accountant)",
                esc(level),
                esc(p.accountant.as_deref().unwrap_or("rdp"))
            );
            if let Some(record) = p.record_epsilon.filter(|r| level == "party" && *r > eps * (1.0 + 1e-9)) {
                let _ = write!(s, "; a record costs ε = {record:.4} in each hospital's ledger");
            }
        }
        (Some(level), _, _) => {
            let _ = write!(s, ", {}-level DP", esc(level));
        }
        _ => s.push_str(", no differential privacy"),
    }
    s
}

/// The federation overview: parties, jobs.
pub fn overview(parties: &[pb::PartyInfo], jobs: &[JobStatus], now: u64) -> String {
    let mut b = String::from("<h1>Federation</h1>\n<section><h2>Parties</h2>");
    if parties.is_empty() {
        b.push_str("<p class=\"muted\">No party is enrolled.</p>");
    } else {
        b.push_str(
            "<table id=\"parties\"><thead><tr><th>Party</th><th>Connection</th><th>Certificate expires</th>\
             <th>Version</th><th>Advertised policy</th><th>Last seen</th></tr></thead><tbody>",
        );
        for p in parties {
            let conn = match (p.connected, p.relay.is_empty()) {
                (true, true) => "<span class=\"badge ok\">connected</span>".to_owned(),
                (true, false) => format!("<span class=\"badge ok\">connected</span> via relay {}", esc(&p.relay)),
                (false, _) => "<span class=\"badge off\">disconnected</span>".to_owned(),
            };
            let enrolled = if p.enrolled { "" } else { " <span class=\"badge bad\">not enrolled</span>" };
            let expiry = if p.certificate_not_after == 0 {
                String::new()
            } else {
                let until = i64::try_from(p.certificate_not_after).unwrap_or(i64::MAX);
                let days = until.saturating_sub(i64::try_from(now).unwrap_or(i64::MAX)) / 86_400;
                let class = if days < 30 { "warn" } else { "" };
                format!("<span class=\"{class}\">{} ({days} days)</span>", when(p.certificate_not_after))
            };
            let _ = write!(
                b,
                "<tr data-party=\"{n}\"><td>{n}{enrolled}</td><td>{conn}</td><td>{expiry}</td><td>{v}</td>\
                 <td>{pol}</td><td>{seen}</td></tr>",
                n = esc(&p.name),
                v = esc(&p.software_version),
                pol = policy_summary(&p.policy_json),
                seen = when(p.last_seen),
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>\n<section><h2>Jobs</h2>");
    if jobs.is_empty() {
        b.push_str("<p class=\"muted\">No job yet.</p>");
    } else {
        b.push_str(
            "<table id=\"jobs\"><thead><tr><th>Job</th><th>Name</th><th>Kind</th><th>State</th><th>Rounds</th>\
             <th>Privacy</th><th>Metrics</th><th>Submitted</th></tr></thead><tbody>",
        );
        for j in jobs {
            let eps = j.privacy.epsilon.map(|e| format!(", ε = {e:.3}")).unwrap_or_default();
            let _ = write!(
                b,
                "<tr><td><a href=\"/jobs/{id}\">{id}</a></td><td>{name}</td><td>{kind}</td><td>{state}</td>\
                 <td>{done} / {total}</td><td>{agg}{eps}</td><td>{metrics}</td><td>{at}</td></tr>",
                id = esc(&j.id),
                name = esc(&j.name),
                kind = esc(&j.kind),
                state = state_badge(j.state),
                done = j.rounds_completed,
                total = j.rounds_total,
                agg = esc(&j.privacy.aggregation),
                metrics = metrics_summary(&j.metrics),
                at = when(j.created_at),
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>");
    b
}

/// What a party's advertised policy accepts, in a few words.
fn policy_summary(json: &str) -> String {
    let Ok(serde_json::Value::Object(p)) = serde_json::from_str::<serde_json::Value>(json) else {
        return "<span class=\"muted\">not advertised</span>".into();
    };
    let list = |k: &str| {
        p.get(k)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    let mut parts = vec![format!("aggregation: {}", esc(&list("aggregation")))];
    if p.get("require_dp").and_then(|v| v.as_bool()) == Some(true) {
        parts.push("requires DP".into());
    }
    if let Some(e) = p.get("max_epsilon").and_then(|v| v.as_f64()) {
        parts.push(format!("ε ≤ {e}"));
    }
    if let Some(n) = p.get("min_parties").and_then(|v| v.as_u64()) {
        parts.push(format!("≥ {n} parties"));
    }
    if let Some(f) = p.get("min_corrupt_fraction").and_then(|v| v.as_f64()) {
        parts.push(format!("assumes ≥ {f} corrupt"));
    }
    parts.push(format!("kinds: {}", esc(&list("job_kinds"))));
    parts.join("; ")
}

/// Quality metrics (not timings) with 4 significant digits.
fn metrics_summary(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .filter(|(k, _)| !is_timing(k) && !is_bookkeeping(k))
        .map(|(k, v)| format!("{} {}", esc(k), fmt_value(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_value(v: f64) -> String {
    if v.is_finite() && v.abs() >= 1000.0 { format!("{v:.0}") } else { format!("{v:.4}") }
}

fn is_timing(key: &str) -> bool {
    key.ends_with("_ms") || key.ends_with("_ms_max")
}

/// Round metrics that are counts or privacy bookkeeping, charted apart or not at all.
fn is_bookkeeping(key: &str) -> bool {
    matches!(key, "epsilon" | "num_examples" | "train_examples" | "dp_clip")
}

/// The job page: everything under `<div id="job-body">`, which live
/// updates replace.
pub fn job_page(st: &JobStatus) -> String {
    format!(
        "<div id=\"job-body\" data-job=\"{id}\" data-state=\"{state}\" data-rounds=\"{done}\">{body}</div>",
        id = esc(&st.id),
        state = st.state.as_str(),
        done = st.rounds_completed,
        body = job_body(st)
    )
}

/// The inside of the job page, what each live update carries.
pub fn job_body(st: &JobStatus) -> String {
    let mut b = format!(
        "<h1>Job {id} <small>{name}</small></h1>\n<p class=\"facts\">{state} {kind} · rounds \
         <b id=\"rounds\">{done} / {total}</b> · {privacy} · updated {updated}</p>",
        id = esc(&st.id),
        name = esc(&st.name),
        state = state_badge(st.state),
        kind = esc(&st.kind),
        done = st.rounds_completed,
        total = st.rounds_total,
        privacy = privacy_line(st),
        updated = when(st.updated_at),
    );
    if let Some(e) = &st.error {
        let _ = write!(b, "<p class=\"error\">{}</p>", esc(e));
    }
    if let Some(p) = &st.pipeline_phase {
        let _ = write!(b, "<p>Pipeline: {}</p>", esc(p));
    }
    b.push_str("<section class=\"charts\">");
    let h = &st.history;
    let keys: std::collections::BTreeSet<&str> = h.iter().flat_map(|r| r.metrics.keys().map(String::as_str)).collect();
    let series_of = |k: &str| -> (String, Vec<(f64, f64)>) {
        let pts = h.iter().filter_map(|r| r.metrics.get(k).map(|v| (f64::from(r.round), *v))).collect();
        (k.to_owned(), pts)
    };
    let quality: Vec<&str> = keys.iter().copied().filter(|k| !is_timing(k) && !is_bookkeeping(k)).collect();
    let losses: Vec<_> = quality.iter().filter(|k| k.contains("loss")).map(|k| series_of(k)).collect();
    let scores: Vec<_> = quality.iter().filter(|k| !k.contains("loss")).map(|k| series_of(k)).collect();
    if losses.is_empty() && scores.is_empty() {
        b.push_str(if st.privacy.dp.is_some() {
            "<p class=\"muted chart-note\">No loss or accuracy per round: under differential privacy the \
             parties report none (each would cost privacy budget).</p>"
        } else {
            "<p class=\"muted chart-note\">No loss or accuracy reported yet.</p>"
        });
    } else {
        b.push_str(&line_chart("loss", "Loss", &losses, false));
        b.push_str(&line_chart("scores", "Accuracy and other scores", &scores, false));
    }
    if keys.contains("epsilon") {
        b.push_str(&line_chart("epsilon", "Privacy spent (ε)", &[series_of("epsilon")], true));
    }
    let mut timings: Vec<_> = keys
        .iter()
        .filter(|k| k.starts_with("stage_") && k.ends_with("_ms"))
        .map(|k| {
            let (_, pts) = series_of(k);
            (k.trim_start_matches("stage_").trim_end_matches("_ms").to_owned(), pts)
        })
        .collect();
    if keys.contains("round_ms") {
        timings.push(("whole round".to_owned(), series_of("round_ms").1));
    }
    b.push_str(&line_chart("stages", "Stage timings (ms)", &timings, true));
    b.push_str("</section>");
    b.push_str(&rounds_table(h));
    b.push_str(&parties_table(st));
    if !st.iterations.is_empty() {
        b.push_str(
            "<section><h2>Pipeline iterations</h2><table><thead><tr><th>#</th><th>Trigger</th><th>Outcome</th>\
             <th>Gate</th><th>Check</th></tr></thead><tbody>",
        );
        for it in &st.iterations {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                it.iteration,
                esc(&it.trigger),
                esc(&it.outcome),
                esc(&it.gate),
                esc(&it.check)
            );
        }
        b.push_str("</tbody></table></section>");
    }
    b
}

fn rounds_table(h: &[RoundRecord]) -> String {
    if h.is_empty() {
        return "<section><h2>Rounds</h2><p class=\"muted\">No round has completed yet.</p></section>".into();
    }
    let mut b = String::from(
        "<section><h2>Rounds</h2><table id=\"rounds-table\"><thead><tr><th>Round</th><th>Contributors</th>\
         <th>Dropped (stage: reason)</th><th>Roles</th><th>Metrics</th><th>Time</th><th>Completed</th></tr></thead><tbody>",
    );
    for r in h.iter().rev() {
        let dropped: Vec<String> =
            r.dropped.iter().map(|(p, why)| format!("<b>{}</b>: {}", esc(p), esc(why))).collect();
        let roles: Vec<String> =
            r.roles.iter().map(|(role, ps)| format!("{}: {}", esc(role), esc(&ps.join(", ")))).collect();
        let ms = r.metrics.get("round_ms").map(|v| format!("{v:.0} ms")).unwrap_or_default();
        let _ = write!(
            b,
            "<tr data-round=\"{n}\"><td>{n}</td><td title=\"{who}\">{count}</td><td class=\"{dc}\">{dropped}</td>\
             <td>{roles}</td><td>{metrics}</td><td>{ms}</td><td>{at}</td></tr>",
            n = r.round,
            who = esc(&r.participants.join(", ")),
            count = r.participants.len(),
            dc = if r.dropped.is_empty() { "" } else { "warn" },
            dropped = dropped.join("<br>"),
            roles = roles.join("<br>"),
            metrics = metrics_summary(&r.metrics),
            at = when(r.completed_at),
        );
    }
    b.push_str("</tbody></table></section>");
    b
}

fn parties_table(st: &JobStatus) -> String {
    let mut b = String::from(
        "<section><h2>Parties of the job</h2><table id=\"job-parties\"><thead><tr><th>Party</th><th>State</th>\
         <th>Last round</th><th>Detail</th></tr></thead><tbody>",
    );
    for (name, p) in &st.parties {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            p.state.as_str(),
            p.last_round,
            esc(p.detail.as_deref().unwrap_or(""))
        );
    }
    b.push_str("</tbody></table></section>");
    b
}

const COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

/// An SVG line chart of `series` over rounds, each line labelled at its
/// end (no legend to hunt), every point with a tooltip. `from_zero` starts
/// the y axis at 0.
pub fn line_chart(id: &str, title: &str, series: &[(String, Vec<(f64, f64)>)], from_zero: bool) -> String {
    let (w, h) = (600.0_f64, 230.0_f64);
    let (left, right, top, bottom) = (56.0, 200.0, 24.0, 30.0);
    let points: Vec<(f64, f64)> =
        series.iter().flat_map(|(_, p)| p.iter().copied()).filter(|&(x, y)| plottable(x, y)).collect();
    let mut out = format!("<figure class=\"chart\" id=\"chart-{id}\"><figcaption>{}</figcaption>", esc(title));
    if points.is_empty() {
        out.push_str("<p class=\"muted\">No data yet.</p></figure>");
        return out;
    }
    let x_min = points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let mut y_min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut y_max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if from_zero {
        y_min = y_min.min(0.0);
    }
    if y_max - y_min < 1e-12 {
        y_max += 0.5_f64.max(y_max.abs() * 0.05);
        y_min -= if from_zero && y_min >= 0.0 { 0.0 } else { 0.5_f64.max(y_min.abs() * 0.05) };
    }
    let pad = (y_max - y_min) * 0.05;
    let (y_lo, y_hi) = (if from_zero && y_min >= 0.0 { y_min } else { y_min - pad }, y_max + pad);
    let x_span = (x_max - x_min).max(1.0);
    let sx = |x: f64| left + (x - x_min) / x_span * (w - left - right);
    let sy = |y: f64| top + (y_hi - y) / (y_hi - y_lo) * (h - top - bottom);
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{t}\">",
        t = esc(title)
    );
    // Axes with the extremes and a middle tick on each.
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{yb}\"/>\
         <line class=\"axis\" x1=\"{left}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\"/>",
        yb = h - bottom,
        xr = w - right
    );
    for y in [y_lo, (y_lo + y_hi) / 2.0, y_hi] {
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{left}\" y1=\"{py:.1}\" x2=\"{xr}\" y2=\"{py:.1}\"/>\
             <text class=\"tick\" x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\">{}</text>",
            short(y),
            py = sy(y),
            xr = w - right,
            tx = left - 4.0,
            ty = sy(y) + 4.0
        );
    }
    // The first and last rounds, and a middle one strictly between them.
    let mid = ((x_min + x_max) / 2.0).round();
    let mut ticks = vec![x_min];
    if mid > x_min && mid < x_max {
        ticks.push(mid);
    }
    if x_max > x_min {
        ticks.push(x_max);
    }
    for x in ticks {
        let _ = write!(
            out,
            "<text class=\"tick\" x=\"{px:.1}\" y=\"{ty}\" text-anchor=\"middle\">{x}</text>",
            px = sx(x),
            ty = h - bottom + 16.0
        );
    }
    let _ = write!(
        out,
        "<text class=\"tick\" x=\"{x}\" y=\"{y}\" text-anchor=\"end\">round</text>",
        x = w - right,
        y = h - 2.0
    );
    // Lines, then their end labels spread apart so none overlaps.
    let mut labels: Vec<(f64, String, &str)> = Vec::new();
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|&(x, y)| plottable(x, y)).collect();
        if pts.is_empty() {
            continue;
        }
        let coords: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = write!(
            out,
            "<polyline data-series=\"{n}\" data-points=\"{c}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{p}\"/>",
            n = esc(name),
            c = pts.len(),
            p = coords.join(" ")
        );
        for &(x, y) in &pts {
            let _ = write!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"><title>{} round {x}: {}</title></circle>",
                sx(x),
                sy(y),
                esc(name),
                fmt_value(y)
            );
        }
        if let Some(&(_, y)) = pts.last() {
            labels.push((sy(y), format!("{} {}", name, short(y)), colour));
        }
    }
    labels.sort_by(|a, b| a.0.total_cmp(&b.0));
    // 13 px apart (closer when many must fit), pushed down, then back up
    // from the bottom edge, never above the top.
    let gap = if labels.len() > 1 { 13.0_f64.min((h - 8.0 - top) / (labels.len() - 1) as f64) } else { 13.0 };
    let mut ys: Vec<f64> = Vec::with_capacity(labels.len());
    for (y, _, _) in &labels {
        let prev = ys.last().copied().unwrap_or(f64::NEG_INFINITY);
        ys.push(y.max(prev + gap));
    }
    let mut floor = h - 8.0;
    for y in ys.iter_mut().rev() {
        *y = y.min(floor).max(top);
        floor = *y - gap;
    }
    for ((_, text, colour), y) in labels.into_iter().zip(ys) {
        let _ = write!(
            out,
            "<text class=\"label\" x=\"{x}\" y=\"{y:.1}\" fill=\"{colour}\">{t}</text>",
            x = w - right + 6.0,
            y = y + 4.0,
            t = esc(&text)
        );
    }
    out.push_str("</svg></figure>");
    out
}

/// Values a chart can place: finite and small enough that their range
/// stays finite (a party's metric of 1e308 is dropped, not drawn as NaN).
fn plottable(x: f64, y: f64) -> bool {
    x.is_finite() && y.is_finite() && x.abs() < 1e12 && y.abs() < 1e300
}

/// A tick or label value in at most 4 significant digits.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A service as the models page shows it.
pub struct ServiceView {
    /// Its name.
    pub name: String,
    /// Its deployment history, newest first, verified here; or why it did
    /// not verify.
    pub history: Result<Vec<SignedDeployment>, String>,
    /// The serving parties' reported counts, summed, and who reported.
    pub serving: Option<pb::ServiceRows>,
    /// The parties whose reports are summed.
    pub serving_parties: Vec<String>,
    /// How many deployments it has in all (`history` holds the newest).
    pub total: u64,
}

/// Rows answered and the forwarded fraction, from serving reports.
fn serving_line(rows: &pb::ServiceRows, parties: &[String]) -> String {
    let total = rows.edge_rows.saturating_add(rows.cloud_rows).saturating_add(rows.edge_hard_rows);
    if parties.is_empty() || rows.requests == 0 {
        return "<p class=\"muted\">No serving party has reported a prediction yet.</p>".into();
    }
    let pct = |n: u64| if total == 0 { 0.0 } else { 100.0 * n as f64 / total as f64 };
    format!(
        "<p class=\"serving\" data-forwarded=\"{cloud}\" data-rows=\"{total}\">{req} requests, {total} rows \
         answered by {who}: <b>{fwd:.1}% forwarded</b> to the cloud tier ({cloud} rows), {hard:.1}% hard but \
         answered at the edge, {edge:.1}% answered at the edge (counts since each party started).</p>",
        cloud = rows.cloud_rows,
        req = rows.requests,
        who = esc(&parties.join(", ")),
        fwd = pct(rows.cloud_rows),
        hard = pct(rows.edge_hard_rows),
        edge = pct(rows.edge_rows),
    )
}

/// Model versions and services. Deployment records are shown only once
/// their administrator's signature verified here: the coordinator is not
/// trusted to report them.
pub fn models(models: &[pb::ModelVersion], services: &[ServiceView], more_services: bool) -> String {
    let mut b = String::from("<h1>Models and services</h1><section><h2>Services</h2>");
    if services.is_empty() {
        b.push_str("<p class=\"muted\">No service is deployed.</p>");
    }
    if more_services {
        b.push_str(
            "<p class=\"muted\">More services than one page holds: the rest are not shown (<code>confide model \
             services NAME</code> lists one).</p>",
        );
    }
    for svc in services {
        let _ = write!(b, "<h3>{}</h3>", esc(&svc.name));
        if let Some(rows) = &svc.serving {
            b.push_str(&serving_line(rows, &svc.serving_parties));
        }
        match &svc.history {
            Err(e) => {
                let _ = write!(b, "<p class=\"error\">The coordinator's history does not verify: {}</p>", esc(e));
            }
            Ok(h) => {
                let rollbacks = h.iter().filter(|d| d.record.action == DeployAction::Rollback).count();
                if let Some(current) = h.first() {
                    let r = &current.record;
                    let _ = write!(
                        b,
                        "<p>Serving job <a href=\"/jobs/{job}\">{job}</a> round {round} ({sha}) since {at}; \
                         {n} deployments, {rollbacks} rollbacks{shown}{joint}.</p>",
                        job = esc(&r.job_id),
                        round = r.round,
                        sha = esc(r.sha256.get(..12).unwrap_or(&r.sha256)),
                        at = when(r.issued_at),
                        n = svc.total.max(h.len() as u64),
                        shown = if svc.total > h.len() as u64 {
                            format!(" among the {} listed", h.len())
                        } else {
                            String::new()
                        },
                        joint = if r.joint.is_some() { "; joint inference with a cloud tier" } else { "" },
                    );
                }
                b.push_str(
                    "<table class=\"deployments\"><thead><tr><th>#</th><th>Action</th><th>Job</th><th>Round</th>\
                     <th>Signed by</th><th>At</th></tr></thead><tbody>",
                );
                for d in h {
                    let r = &d.record;
                    let _ = write!(
                        b,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        r.sequence,
                        r.action.as_str(),
                        esc(&r.job_id),
                        r.round,
                        esc(&r.admin),
                        when(r.issued_at)
                    );
                }
                b.push_str("</tbody></table>");
            }
        }
    }
    b.push_str("</section><section><h2>Model versions</h2>");
    if models.is_empty() {
        b.push_str("<p class=\"muted\">No model version is kept.</p>");
    } else {
        b.push_str(
            "<table id=\"models\"><thead><tr><th>Job</th><th>Round</th><th>SHA-256</th><th>Size</th>\
             <th>Metrics</th><th>Services</th><th>Created</th></tr></thead><tbody>",
        );
        for m in models {
            let metrics: BTreeMap<String, f64> = m.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let _ = write!(
                b,
                "<tr><td><a href=\"/jobs/{job}\">{job}</a></td><td>{round}</td><td><code>{sha}</code></td>\
                 <td>{kb:.1} KB</td><td>{metrics}</td><td>{services}</td><td>{at}</td></tr>",
                job = esc(&m.job_id),
                round = m.round,
                sha = esc(m.sha256.get(..12).unwrap_or(&m.sha256)),
                kb = m.bytes as f64 / 1000.0,
                metrics = metrics_summary(&metrics),
                services = esc(&m.services.join(", ")),
                at = when(m.created_at),
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_from_parties_are_escaped() {
        assert_eq!(esc("<script>\"x\"&'y'</script>"), "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;");
        let info = pb::PartyInfo {
            name: "<img src=x onerror=alert(1)>".into(),
            enrolled: true,
            policy_json: r#"{"aggregation":["<b>secagg</b>"],"job_kinds":["train"]}"#.into(),
            ..Default::default()
        };
        let html = overview(&[info], &[], 0);
        assert!(!html.contains("<img") && !html.contains("<b>secagg"), "{html}");
        assert!(html.contains("&lt;b&gt;secagg"), "{html}");
    }

    #[test]
    fn the_forwarded_fraction_is_cloud_rows_over_all_rows() {
        let rows =
            pb::ServiceRows { service: "s".into(), requests: 10, edge_rows: 70, cloud_rows: 20, edge_hard_rows: 10 };
        let line = serving_line(&rows, &["a".into(), "<b>".into()]);
        assert!(line.contains("<b>20.0% forwarded</b>") && line.contains("10.0% hard"), "{line}");
        assert!(line.contains("a, &lt;b&gt;"), "{line}");
        assert!(serving_line(&pb::ServiceRows::default(), &[]).contains("No serving party"));
    }

    #[test]
    fn a_chart_has_one_point_per_round_and_labels_each_line() {
        let series = vec![
            ("loss".to_owned(), vec![(1.0, 0.7), (2.0, 0.5), (3.0, 0.4)]),
            ("eval_loss".to_owned(), vec![(1.0, 0.72), (3.0, 0.41)]),
        ];
        let svg = line_chart("loss", "Loss", &series, false);
        assert!(svg.contains("data-series=\"loss\" data-points=\"3\""), "{svg}");
        assert!(svg.contains("data-series=\"eval_loss\" data-points=\"2\""), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.contains(">loss 0.400<") && svg.contains(">eval_loss 0.410<"), "{svg}");
        // Every coordinate is inside the drawing.
        let coords = svg.split(" points=\"").skip(1).flat_map(|s| s.split('"').next().unwrap().split(' '));
        for c in coords {
            let (x, y) = c.split_once(',').unwrap();
            let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
            assert!((0.0..=600.0).contains(&x) && (0.0..=230.0).contains(&y), "{c}");
        }
        assert!(line_chart("x", "X", &[], false).contains("No data yet"));
        // One round: one x tick; two rounds: both.
        let one = line_chart("l", "L", &[("loss".into(), vec![(1.0, 0.5)])], false);
        assert_eq!(one.matches("text-anchor=\"middle\"").count(), 1, "{one}");
        let two = line_chart("l", "L", &[("loss".into(), vec![(1.0, 0.5), (2.0, 0.4)])], false);
        assert!(two.contains(">1</text>") && two.contains(">2</text>"), "{two}");
        // Extreme values are dropped, never NaN; twenty series keep their
        // labels inside the drawing.
        let wild = line_chart("w", "W", &[("a".into(), vec![(1.0, 1e308), (2.0, -1e308), (3.0, 0.5)])], false);
        assert!(!wild.contains("NaN") && !wild.contains("inf") && wild.contains("data-points=\"1\""), "{wild}");
        let many: Vec<(String, Vec<(f64, f64)>)> =
            (0..20).map(|i| (format!("s{i}"), vec![(1.0, 1.0), (2.0, f64::from(i) * 1e-3)])).collect();
        let crowded = line_chart("m", "M", &many, false);
        for y in crowded.split("class=\"label\"").skip(1).map(|t| {
            let y = t.split("y=\"").nth(1).unwrap().split('"').next().unwrap();
            y.parse::<f64>().unwrap()
        }) {
            assert!((24.0..=230.0).contains(&y), "a label at y = {y}");
        }
        // A flat series still draws inside the box.
        let flat = line_chart("e", "ε", &[("epsilon".into(), vec![(1.0, 2.0), (2.0, 2.0)])], true);
        assert!(flat.contains("data-points=\"2\"") && !flat.contains("NaN"), "{flat}");
    }

    #[test]
    fn the_job_page_charts_quality_privacy_and_stages_apart() {
        use confide_proto::status::PrivacyStatus;
        let mut st = JobStatus {
            id: "j1".into(),
            name: "demo".into(),
            kind: "train".into(),
            state: JobState::Running,
            rounds_completed: 2,
            rounds_total: 5,
            parties: BTreeMap::new(),
            metrics: BTreeMap::new(),
            history: Vec::new(),
            privacy: PrivacyStatus {
                aggregation: "secagg".into(),
                dp: Some("example".into()),
                epsilon: Some(2.0),
                delta: Some(1e-5),
                accountant: None,
                record_epsilon: Some(2.0),
            },
            error: None,
            model: None,
            created_at: 0,
            updated_at: 0,
            iterations: Vec::new(),
            pipeline_phase: None,
        };
        for round in 1..=2 {
            let mut r = RoundRecord {
                round,
                metrics: BTreeMap::new(),
                participants: vec!["a".into(), "b".into()],
                dropped: BTreeMap::new(),
                completed_at: 0,
                roles: BTreeMap::new(),
            };
            r.metrics.insert("train_loss".into(), 0.5 / f64::from(round));
            r.metrics.insert("accuracy".into(), 0.8 + 0.05 * f64::from(round));
            r.metrics.insert("epsilon".into(), f64::from(round));
            r.metrics.insert("stage_fit_ms".into(), 120.0);
            r.metrics.insert("round_ms".into(), 150.0);
            if round == 2 {
                r.dropped.insert("c".into(), "fit: <timeout>".into());
            }
            st.history.push(r);
        }
        let html = job_page(&st);
        assert!(html.contains("data-state=\"running\"") && html.contains("<b id=\"rounds\">2 / 5</b>"));
        for chart in ["chart-loss", "chart-scores", "chart-epsilon", "chart-stages"] {
            assert!(html.contains(chart), "{chart}");
        }
        assert!(html.contains("data-series=\"train_loss\" data-points=\"2\""));
        assert!(html.contains("data-series=\"fit\" data-points=\"2\""));
        assert!(html.contains("<b>c</b>: fit: &lt;timeout&gt;"), "{html}");
    }
}
